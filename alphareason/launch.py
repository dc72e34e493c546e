"""Multi-process runs on one machine: N processes on 127.0.0.1, each with its own virtual CPU devices.

JAX's multi-controller runtime works on a CPU (gloo collectives): several
processes on this machine, each with
``XLA_FLAGS=--xla_force_host_platform_device_count=D``, joined through a
coordinator on 127.0.0.1, run exactly the code paths of a multi-host pod.
The tests and ``alphareason bench scale`` use this to run real multi-process
training; it is also the quickest way to try a change to the multi-process
code without a cluster:

    results = launch_local(["-m", "alphareason.cli", "train", ...], num_processes=2, devices_per_process=2)

Every process gets ``--coordinator-address 127.0.0.1:PORT --num-processes N
--process-id I`` appended (``with_flags=True``) or the same settings as
``JAX_*`` environment variables. A process that fails or hangs makes the
launch fail: after the first process exits with an error the others get
``grace_seconds`` to stop by themselves (JAX's heartbeat stops them, naming
the dead process), then they are killed; nothing outlives ``timeout``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence


@dataclasses.dataclass
class ProcessResult:
    process_id: int
    returncode: int | None  # None: killed at the deadline
    stdout: str
    stderr: str
    seconds: float


class LaunchError(RuntimeError):
    """A multi-process launch that did not finish cleanly; the message holds each process's tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_env(devices: int, environ: dict | None = None) -> dict[str, str]:
    """The environment of a CPU process with ``devices`` virtual devices (other XLA flags kept)."""
    env = dict(os.environ if environ is None else environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def launch_local(args: Sequence[str], *, num_processes: int, devices_per_process: int, timeout: float = 600,
                 grace_seconds: float = 60, with_flags: bool = True, env: dict | None = None,
                 cwd: str | None = None, per_process_args: Sequence[Sequence[str]] | None = None,
                 check: bool = True) -> list[ProcessResult]:
    """Runs ``python ARGS`` as ``num_processes`` processes of one JAX run on 127.0.0.1.

    ``per_process_args`` (optional) appends different arguments to each.
    Returns every process's result; with ``check`` raises ``LaunchError``
    (with each process's output tail) unless all exited with status 0.
    """
    port = free_port()
    address = f"127.0.0.1:{port}"
    base_env = device_env(devices_per_process, env)
    procs, files, started = [], [], time.time()
    for i in range(num_processes):
        argv = [sys.executable, *args]
        proc_env = dict(base_env)
        if with_flags:
            argv += ["--coordinator-address", address, "--num-processes", str(num_processes), "--process-id", str(i)]
        else:
            proc_env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(num_processes),
                            JAX_PROCESS_ID=str(i))
        if per_process_args is not None:
            argv += list(per_process_args[i])
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        files.append((out, err))
        procs.append(subprocess.Popen(argv, env=proc_env, cwd=cwd, stdout=out, stderr=err, start_new_session=True))
    ends: dict[int, float] = {}
    first_failure: float | None = None
    while len(ends) < num_processes:
        now = time.time()
        for i, p in enumerate(procs):
            if i not in ends and p.poll() is not None:
                ends[i] = now
                if p.returncode != 0 and first_failure is None:
                    first_failure = now
        over = now - started > timeout or (first_failure is not None and now - first_failure > grace_seconds)
        if over:
            for i, p in enumerate(procs):
                if i not in ends:
                    os.killpg(p.pid, signal.SIGKILL)  # its own session: the process and anything it started
                    p.wait()
                    ends[i] = time.time()
            break
        time.sleep(0.2)
    results = []
    for i, (p, (out, err)) in enumerate(zip(procs, files)):
        out.seek(0)
        err.seek(0)
        killed = p.returncode is not None and p.returncode == -signal.SIGKILL
        results.append(ProcessResult(process_id=i, returncode=None if killed else p.returncode, stdout=out.read(),
                                     stderr=err.read(), seconds=ends[i] - started))
        out.close()
        err.close()
    if check and any(r.returncode != 0 for r in results):
        raise LaunchError(describe(results))
    return results


def describe(results: Sequence[ProcessResult], tail: int = 2000) -> str:
    """Each process's exit status and the end of its stderr, for error messages."""
    parts = []
    for r in results:
        status = "killed (did not stop in time)" if r.returncode is None else f"exit status {r.returncode}"
        parts.append(f"--- process {r.process_id}: {status} after {r.seconds:.0f}s\n{r.stderr[-tail:]}")
    return "\n".join(parts)
