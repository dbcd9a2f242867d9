"""``f1_adaptive_threshold``: anomalib 2.7's F1 adaptive threshold of one set of scores."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src import f1_curve, validation
from jaxnorm._src.f1_inputs import (
    check_inputs,
    check_policy,
    chunk_range,
    key_range,
    prepare,
    raise_if_nonfinite,
)
from jaxnorm._src.f1_keys import from_key

ArrayLike = validation.ArrayLike
logger = logging.getLogger("jaxnorm")

_EXACT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


def f1_adaptive_threshold(
    scores: ArrayLike,
    labels: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    nonfinite: str = "raise",
) -> jax.Array:
    r"""The score with the best F1 on ``(scores, labels)``: anomalib 2.7's threshold.

    Equal, as float32, to ``anomalib.metrics.F1AdaptiveThreshold()`` after ``update(scores,
    labels)`` and ``compute()`` (non-binned), including its one-class fallbacks and its
    float32 rounding:

    - the candidates are the distinct scores; at each, ``p = tp / (tp + fp)``,
      ``r = tp / P`` and ``f1 = 2 p r / (p + r + 1e-10)`` are computed in float32 (counts
      converted first; NaN counts as 0), and the **first** best ``f1`` in ascending order
      of scores wins. float32 rounding can separate thresholds whose F1 is equal in exact
      arithmetic, so a float64 computation picks another threshold on some sets;
    - no label equals 1 (no anomalous sample): the maximum score. anomalib checks
      ``1 in target``, so a 0/255 mask counts as all normal;
    - else no label equals 0: the minimum score;
    - labels other than 0 and 1 count as negatives (as torchmetrics' ``target == 1``).

    It sorts nothing at pixel scale: scores are counted in 65536 bins of their float bits,
    a bound on F1 per bin keeps the few bins where the best threshold can lie, and only
    those are resolved exactly (see ``jaxnorm._src.f1_curve`` for the proof). Subnormal
    scores are kept apart from 0, as torch keeps them (all work is on integer keys).

    Args:
      scores: anomaly scores of any shape (image scores, or anomaly maps), numpy or jax;
        float16, bfloat16 and float32 are exact; integers beyond 2**24 and float64 are
        rounded to float32 first (jax holds no float64 without x64).
      labels: one label per score (bool or numbers; the same number of values as
        ``scores``, e.g. masks of shape ``(N, H, W)`` for maps of shape ``(N, 1, H, W)``).
      mask: optional bool array broadcastable to ``scores``: False entries are left out
        (padding), scores and labels alike.
      nonfinite: ``"raise"`` (default): NaN or inf scores raise
        ``jaxnorm.NonFiniteScoresError`` with their count. ``"omit"`` leaves them out, with
        their labels.

    Returns:
      A 0-d array in the scores' dtype for float16, bfloat16 and float32 (anomalib returns
      its threshold in the scores' dtype), float32 otherwise.

    Raises:
      ValueError: no score is left to choose from, or the inputs are not arrays of
        matching sizes.
      jaxnorm.NonFiniteScoresError: under ``nonfinite="raise"``.
    """
    where = "f1_adaptive_threshold"
    check_policy(nonfinite)
    scores, labels, mask = check_inputs(where, scores, labels, mask)
    if any(validation.is_tracer(x) for x in (scores, labels, mask)):
        raise ValueError(
            f"{where} reads counts back to the host, so it cannot run under jit. Inside a "
            "jitted step fold the batches into jaxnorm.F1AdaptiveThreshold.empty("
            "mode='bounded') and call .compute() after the loop."
        )
    dtype = scores.dtype if scores.dtype in _EXACT_DTYPES else jnp.float32
    if np.prod(scores.shape) <= f1_curve.SORT_BELOW:
        n_bad, n_pos, n_neg, n_zero, lo, hi, best = _small(scores, labels, mask)
        n_bad, n_pos, n_neg, n_zero = (
            int(x) for x in jax.device_get((n_bad, n_pos, n_neg, n_zero))
        )
    else:
        key, code, counts, n_bad = _large(scores, labels, mask)
        best = None
        host = np.asarray(counts).sum(axis=0, dtype=np.int64)
        n_zero, n_pos, n_neg = int(host[0]), int(host[1]), int(host[0] + host[2])
        n_bad = int(n_bad)
    raise_if_nonfinite(where, n_bad, nonfinite)
    fallback = fallback_end(where, n_pos, n_neg, n_zero > 0)
    if fallback is not None and best is None:
        lo, hi = key_range([(key, code)])
    if fallback is not None:
        return _value(jnp.uint32(hi if fallback == "max" else lo), dtype)
    if best is None:
        best = f1_curve.best_threshold_key(f1_curve.neg_pos(counts), [(key, code)])[1]
    return _value(best, dtype)


def fallback_end(where: str, n_pos: int, n_neg: int, has_zero: bool) -> str | None:
    """anomalib's one-class answers: ``"max"`` (the highest score) without a label 1,
    ``"min"`` (the lowest) without a label 0, ``None`` when the F1 curve decides.

    Raises:
      ValueError: no score was counted.
    """
    if n_pos + n_neg == 0:
        raise ValueError(
            f"{where}: no score to choose a threshold from (every score was masked out or "
            "not finite, or none was given); validate on some data first."
        )
    if n_pos == 0:
        logger.warning(
            "%s: no label equals 1 (no anomalous sample; a 0/255 mask has none either): the "
            "threshold is the highest score, as anomalib's.",
            where,
        )
        return "max"
    if not has_zero:
        logger.warning(
            "%s: no label equals 0 (no normal sample): the threshold is the lowest score, "
            "as anomalib's.",
            where,
        )
        return "min"
    return None


@jax.jit
def _small(scores, labels, mask):
    key, code = prepare(scores, labels, mask)
    counts, n_bad = f1_curve.bin_counts(key, code, mask)
    lo, hi = chunk_range(key, code)
    _, best = f1_curve.sort_sweep(key, code)
    n_zero, n_pos, n_other = jnp.sum(counts, axis=0)
    return n_bad, n_pos, n_zero + n_other, n_zero, lo, hi, best


@jax.jit
def _large(scores, labels, mask):
    key, code = prepare(scores, labels, mask)
    counts, n_bad = f1_curve.bin_counts(key, code, mask)
    return key, code, counts, n_bad


@functools.partial(jax.jit, static_argnames="dtype")
def _value(key, dtype):
    return from_key(key, dtype)
