"""The huge-page restart (alphareason/host_memory.py): when it restarts, with what, and that it runs the same command."""

import os
import subprocess
import sys

import pytest

from alphareason.host_memory import (TUNABLE, glibc_version, huge_pages_environ, transparent_huge_pages_mode)

GLIBC = (2, 36)


def test_restarts_with_the_tunable_where_it_helps():
    env = huge_pages_environ({"PATH": "/bin"}, thp_mode="madvise", glibc=GLIBC)
    assert env["GLIBC_TUNABLES"] == TUNABLE and env["PATH"] == "/bin"
    # Other tunables the user set are kept.
    env = huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp_mode="madvise", glibc=GLIBC)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"


@pytest.mark.parametrize("environ, thp_mode, glibc", [
    ({}, "always", GLIBC),  # the kernel already backs every mapping with huge pages
    ({}, "never", GLIBC),  # nothing to gain
    ({}, None, GLIBC),  # no transparent huge pages at all
    ({}, "madvise", (2, 34)),  # glibc without the tunable
    ({}, "madvise", None),  # not glibc (musl)
    ({"ALPHAREASON_HUGE_PAGES": "0"}, "madvise", GLIBC),  # switched off
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC),  # the user's own choice
    ({"ALPHAREASON_HUGE_PAGES_RESTARTED": "1"}, "madvise", GLIBC),  # never twice
])
def test_no_restart(environ, thp_mode, glibc):
    assert huge_pages_environ(environ, thp_mode=thp_mode, glibc=glibc) is None


def test_thp_mode_is_read_from_the_kernel_file(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert transparent_huge_pages_mode(str(f)) == "madvise"
    assert transparent_huge_pages_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(not sys.platform.startswith("linux") or (glibc_version() or (0, 0)) < (2, 35)
                    or transparent_huge_pages_mode() != "madvise",
                    reason="the restart only happens on Linux with glibc >= 2.35 and THP in madvise mode")
def test_the_process_restarts_itself_with_its_own_arguments():
    code = ("import os, sys; from alphareason.host_memory import reexec_with_huge_pages; "
            "print('started', flush=True); reexec_with_huge_pages(); "
            "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "ALPHAREASON_HUGE_PAGES", "ALPHAREASON_HUGE_PAGES_RESTARTED")}
    out = subprocess.run([sys.executable, "-c", code, "a", "--b"], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    # Started twice (the second time with the tunable), then ran to the end once.
    assert out == ["started", "started", f"{TUNABLE} ['a', '--b']"]
