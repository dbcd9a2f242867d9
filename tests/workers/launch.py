"""Launches a group of worker processes with a fresh free port, a deadline and cleanup.

Every child runs in its own session (process group), so that the processes a child starts
(Lightning's, gloo's) are killed with it when the group fails or runs out of time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# stderr text that says the port was taken between choosing it and binding it.
PORT_TAKEN = ("address already in use", "eaddrinuse", "errno 98", "failed to bind")


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without the 8-device XLA flag, plus ``extra``.

    The main pytest session simulates 8 CPU devices (tests/conftest.py); a child process
    gets one device unless it asks for more with ``XLA_FLAGS``.
    """
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in extra.items():
        if k == "XLA_FLAGS":
            env[k] = (env[k] + " " + v).strip()
        else:
            env[k] = v
    return env


def ddp_commands(script: str, args: list[str], world_size: int, **extra: str):
    """``commands(port)`` for ``run_group``: ``script`` once per torch.distributed rank, each
    with the ``env://`` rendezvous variables (one thread each) plus ``extra``."""

    def commands(port: int) -> list[tuple[list[str], dict[str, str]]]:
        return [
            (
                [script, *args],
                child_env(
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                    WORLD_SIZE=str(world_size),
                    RANK=str(rank),
                    LOCAL_RANK=str(rank),
                    NODE_RANK="0",
                    OMP_NUM_THREADS="1",
                    **extra,
                ),
            )
            for rank in range(world_size)
        ]

    return commands


@dataclasses.dataclass
class Finished:
    returncodes: list[int]
    logs: list[str]

    def report(self) -> str:
        return "\n".join(
            f"--- process {i} exited with {rc} ---\n{log[-6000:]}"
            for i, (rc, log) in enumerate(zip(self.returncodes, self.logs, strict=True))
        )


class GroupTimeout(AssertionError):
    pass


def run_group(
    make_commands: Callable[[int], Sequence[tuple[list[str], dict[str, str]]]],
    log_dir: Path,
    timeout: float,
    attempts: int = 3,
) -> Finished:
    """Runs ``make_commands(port)`` (one ``(argv, env)`` per process) and waits for all.

    Retries with a new port when a process reports the port taken. Kills every process
    group on timeout, on failure of the launch itself and on return.

    Raises:
      GroupTimeout: the group did not finish within ``timeout`` seconds; the message holds
        the logs of every process.
    """
    for attempt in range(attempts):
        port = free_port()
        finished = _run_once(make_commands(port), log_dir / f"attempt{attempt}", timeout)
        taken = any(
            rc != 0 and any(s in log.lower() for s in PORT_TAKEN)
            for rc, log in zip(finished.returncodes, finished.logs, strict=True)
        )
        if not taken:
            return finished
    return finished


def _run_once(commands, log_dir: Path, timeout: float) -> Finished:
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    files = []
    try:
        for i, (argv, env) in enumerate(commands):
            f = open(log_dir / f"process{i}.log", "w+")
            files.append(f)
            procs.append(
                subprocess.Popen(
                    [sys.executable, *argv],
                    env=env,
                    cwd=REPO,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                _kill(procs)
                raise GroupTimeout(
                    f"processes still running after {timeout:.0f} s (killed):\n"
                    + Finished([p.poll() for p in procs], _read(files)).report()
                )
            time.sleep(0.1)
        return Finished([p.returncode for p in procs], _read(files))
    finally:
        _kill(procs)
        for f in files:
            f.close()


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the child's own session: it and its children
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _read(files) -> list[str]:
    out = []
    for f in files:
        f.flush()
        f.seek(0)
        out.append(f.read())
    return out


def run_ddp_workers(
    script: Path, workdir: Path, inputs: dict, world_size: int, timeout: float
) -> list[dict]:
    """Pickles ``inputs`` to ``workdir/inputs.pkl``, runs ``script workdir`` once per
    torch.distributed rank (``ddp_commands``) and returns what each rank wrote to
    ``workdir/rank{RANK}.json``.

    Raises:
      AssertionError: a rank exited with an error (the message holds every log).
      GroupTimeout: the ranks did not finish within ``timeout`` seconds.
    """
    with open(workdir / "inputs.pkl", "wb") as f:
        pickle.dump(inputs, f)
    commands = ddp_commands(str(script), [str(workdir)], world_size)
    finished = run_group(commands, workdir / "logs", timeout)
    assert finished.returncodes == [0] * world_size, finished.report()
    results = []
    for rank in range(world_size):
        with open(workdir / f"rank{rank}.json") as f:
            results.append(json.load(f))
    return results
