"""Counts XLA compilations, to check that work does not recompile."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Recorded on entering a block, to check that the process-wide listener is still registered
# (``jax.monitoring.clear_event_listeners`` drops every listener).
_PROBE_EVENT = "/jaxnorm/testing/count_compiles_probe"


@dataclasses.dataclass
class CompileLog:
    """The functions compiled while a ``count_compiles`` block ran, in order."""

    names: list[str] = dataclasses.field(default_factory=list)
    durations: list[float] = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def seconds(self) -> float:
        """The time spent compiling, in seconds."""
        return sum(self.durations)


# One listener for the whole process, registered once and never removed: jax before 0.7.2
# has no ``unregister_event_duration_listener``. It appends to the logs of the blocks open
# in the thread that compiled.
_lock = threading.Lock()
_open: dict[int, list[CompileLog]] = {}
_probe_seen = threading.local()


def _listener(event: str, duration: float, **kwargs) -> None:
    if event == _PROBE_EVENT:
        _probe_seen.value = True
        return
    if event != _COMPILE_EVENT:
        return
    with _lock:
        logs = list(_open.get(threading.get_ident(), ()))
    for log in logs:
        log.names.append(str(kwargs.get("fun_name", "?")))
        log.durations.append(float(duration))


def _ensure_listening() -> None:
    """Registers ``_listener`` unless a probe event shows that it is registered already."""
    with _lock:
        _probe_seen.value = False
        jax.monitoring.record_event_duration_secs(_PROBE_EVENT, 0.0)
        if not _probe_seen.value:
            jax.monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileLog]:
    """Records every XLA backend compilation in the block, eager ops and ``jit`` alike.

    Only compilations in the calling thread count. Blocks nest: an inner block's
    compilations count in the outer one too.

    Example::

      with jaxnorm.testing.count_compiles() as log:
          for t in thresholds:
              jaxnorm.normalize(x, t, 0.0, 1.0)
      assert log.count <= 1, log.names
    """
    log = CompileLog()
    thread = threading.get_ident()
    _ensure_listening()
    with _lock:
        _open.setdefault(thread, []).append(log)
    try:
        yield log
    finally:
        with _lock:
            logs = _open[thread]
            # By identity: logs with the same names compare equal.
            del logs[next(i for i, open_log in enumerate(logs) if open_log is log)]
            if not logs:
                del _open[thread]
