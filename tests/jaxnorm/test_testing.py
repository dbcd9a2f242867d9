"""``jaxnorm.testing.count_compiles`` on every supported jax, old ones included."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.testing import count_compiles


def _fresh_jit():
    """A function jax has never compiled: one new compilation on its first call."""

    @jax.jit
    def f(x):
        return jnp.sin(x) * 3.0 + 1.0

    return f


def test_counts_a_compilation():
    f = _fresh_jit()
    x = np.ones(3, np.float32)
    with count_compiles() as log:
        f(x).block_until_ready()
    assert log.count == 1, log.names
    with count_compiles() as log:
        f(x).block_until_ready()
    assert log.count == 0, log.names


def test_works_without_unregister(monkeypatch):
    # jax < 0.7.2 has no unregister_event_duration_listener.
    monkeypatch.delattr(jax.monitoring, "unregister_event_duration_listener", raising=False)
    for _ in range(2):
        with count_compiles() as log:
            _fresh_jit()(np.ones(2, np.float32)).block_until_ready()
        assert log.count == 1, log.names


def test_registers_one_listener_for_the_process(monkeypatch):
    with count_compiles():
        pass
    registered = []
    real = jax.monitoring.register_event_duration_secs_listener
    monkeypatch.setattr(
        jax.monitoring,
        "register_event_duration_secs_listener",
        lambda cb: (registered.append(cb), real(cb))[1],
    )
    for _ in range(5):
        with count_compiles():
            pass
    assert registered == []


def test_survives_clear_event_listeners():
    with count_compiles():
        pass
    jax.monitoring.clear_event_listeners()
    with count_compiles() as log:
        _fresh_jit()(np.ones(4, np.float32)).block_until_ready()
    assert log.count == 1, log.names


def test_nested_blocks_both_count():
    with count_compiles() as outer:
        _fresh_jit()(np.ones(5, np.float32)).block_until_ready()
        with count_compiles() as inner:
            _fresh_jit()(np.ones(6, np.float32)).block_until_ready()
        _fresh_jit()(np.ones(7, np.float32)).block_until_ready()
    assert inner.count == 1, inner.names
    assert outer.count == 3, outer.names


def test_ignores_other_threads():
    started, done = threading.Event(), threading.Event()

    def other():
        started.wait()
        _fresh_jit()(np.ones(8, np.float32)).block_until_ready()
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with count_compiles() as log:
        started.set()
        assert done.wait(60)
    t.join()
    assert log.count == 0, log.names


def test_block_closes_on_error():
    with pytest.raises(RuntimeError), count_compiles() as log:
        raise RuntimeError
    _fresh_jit()(np.ones(9, np.float32)).block_until_ready()
    assert log.count == 0, log.names


def test_sums_compile_seconds():
    with count_compiles() as log:
        _fresh_jit()(np.ones(10, np.float32)).block_until_ready()
    assert log.count == 1 and len(log.durations) == 1, log
    assert log.seconds == sum(log.durations) > 0
