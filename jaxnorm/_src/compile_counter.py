"""Counts XLA compilations, to check that work does not recompile."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class CompileLog:
    """The functions compiled while a ``count_compiles`` block ran, in order."""

    names: list[str] = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.names)


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileLog]:
    """Records every XLA backend compilation in the block, eager ops and ``jit`` alike.

    Example::

      with jaxnorm.testing.count_compiles() as log:
          for t in thresholds:
              jaxnorm.normalize(x, t, 0.0, 1.0)
      assert log.count <= 1, log.names
    """
    log = CompileLog()
    thread = threading.get_ident()

    def listener(event: str, duration: float, **kwargs) -> None:
        del duration
        if event == _COMPILE_EVENT and threading.get_ident() == thread:
            log.names.append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield log
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
