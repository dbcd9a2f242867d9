"""Slow jitted producers for "returns before its inputs are ready" tests (no host sync)."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def calibrated(fn: Callable, seconds: float = 0.3) -> Callable:
    """``produce(seed, flag=False)``: ``fn(seed, flag, steps)`` jitted with ``steps`` static,
    doubled until one call takes at least ``seconds`` on this machine."""
    jitted = jax.jit(fn, static_argnums=2)
    steps = 16
    while True:
        jax.block_until_ready(jitted(jnp.int32(0), jnp.bool_(False), steps))  # compile
        start = time.perf_counter()
        jax.block_until_ready(jitted(jnp.int32(1), jnp.bool_(False), steps))
        if time.perf_counter() - start >= seconds:
            break
        steps *= 2
    return lambda seed, flag=False: jitted(jnp.int32(seed), jnp.bool_(flag), steps)
