"""The code version a result records: the commit, and whether tracked files differ from it."""

import subprocess

from alphareason import provenance


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_code_version_of_a_checkout(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(provenance, "_PACKAGE_DIR", str(repo))
    assert provenance.code_version() == {"commit": head, "dirty": False}
    (repo / "results.json").write_text("{}")  # untracked: results do not make the code dirty
    assert provenance.code_version() == {"commit": head, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.code_version() == {"commit": head, "dirty": True}


def test_code_version_outside_git(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "_PACKAGE_DIR", str(tmp_path))
    assert provenance.code_version() == {"commit": None, "dirty": None}


def test_machine_info_names_the_backend():
    import jax

    info = provenance.machine_info()
    assert info["backend"] == jax.default_backend() and info["cpu_count"] >= 1 and isinstance(info["jax"], str)


def test_a_process_records_the_code_it_started_with(monkeypatch):
    """A commit made in the shared checkout while a run goes on is not what the run records."""
    answers = iter(["a" * 40, "", "b" * 40, ""])  # rev-parse HEAD, then status: a clean checkout at a, then at b
    monkeypatch.setattr(provenance, "_git", lambda *args: next(answers))
    monkeypatch.setattr(provenance, "_AT_START", None)
    assert provenance.process_code_version() == {"commit": "a" * 40, "dirty": False}
    assert provenance.code_version() == {"commit": "b" * 40, "dirty": False}  # the checkout has moved on
    assert provenance.process_code_version() == {"commit": "a" * 40, "dirty": False}
