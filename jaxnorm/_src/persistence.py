"""The hook's thresholds and statistics as state dicts and JSON metadata: pure conversions.

A ``Snapshot`` is what the hook saves and loads, on the host. This module converts it to and
from a state dict or anomalib's JSON metadata, and never sees the hook: the hook makes the
snapshot it saves, and applies the one a load returns. Everything that enters is checked
here, by the checks every outside value takes (``validation.checked_stats``,
``validation.check_threshold``), before the hook changes anything, so a bad source changes
nothing and is reported the same way wherever it comes from: the source, the key and the
value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxnorm._src import validation
from jaxnorm._src.stats import IMAGE, PIXEL, NormalizationStats
from jaxnorm._src.validation import StatsMode

_WHICH = (IMAGE, PIXEL)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The hook's thresholds and statistics on the host, checked.

    Attributes:
      stats: ``{"image": (min, max), "pixel": (min, max)}`` as floats; ``(+inf, -inf)``: none.
      thresholds: ``{"image": t, "pixel": t}``; a load holds only those its source had.
      stats_mode: the layout JSON metadata had (``None`` from a state dict, which holds
        both pairs: statistics that differ make a shared hook separate).
      num_values: values folded into each statistic; ``None`` when the source has no counts.
      num_nonfinite: non-finite values skipped, likewise.
    """

    stats: Mapping[str, tuple[float, float]]
    thresholds: Mapping[str, float]
    stats_mode: StatsMode | None = None
    num_values: Mapping[str, int] | None = None
    num_nonfinite: Mapping[str, int] | None = None


# -- state dicts ----------------------------------------------------------------------------


def to_state_dict(snapshot: Snapshot, stats: NormalizationStats) -> dict[str, Any]:
    """The state dict of ``MinMaxNormalizationHook.state_dict``.

    Args:
      snapshot: the hook's values (thresholds float64, exact; counters uint64).
      stats: the statistics as the hook holds them on the device: a pytree that flax's
        serialization and orbax save as it is.
    """
    counts = {"num_values": snapshot.num_values, "num_nonfinite": snapshot.num_nonfinite}
    return {
        "stats": stats,
        "image_threshold": np.float64(snapshot.thresholds[IMAGE]),
        "pixel_threshold": np.float64(snapshot.thresholds[PIXEL]),
        **{name: {w: np.uint64((c or {}).get(w, 0)) for w in _WHICH} for name, c in counts.items()},
    }


def from_state_dict(state: Mapping[str, Any]) -> Snapshot:
    """A state dict (``to_state_dict``'s, or the plain dicts msgpack returns), checked.

    Raises:
      ValueError: naming the key and the value, for a layout that is not the state dict's,
        a count that is not one, a threshold or statistics that do not pass the checks.
    """
    if not isinstance(state, Mapping):
        raise ValueError(
            f"state: expected the dict of MinMaxNormalizationHook.state_dict(), got "
            f"{type(state).__name__}."
        )
    try:
        stats = state["stats"]
        if isinstance(stats, NormalizationStats):
            pairs = host_pairs(stats)
        else:
            pairs = {w: (stats[w]["min"], stats[w]["max"]) for w in _WHICH}
        thresholds = (state["image_threshold"], state["pixel_threshold"])
    except KeyError as e:
        raise ValueError(
            f"state: expected the layout of MinMaxNormalizationHook.state_dict(), missing {e}."
        ) from None
    except TypeError:
        raise ValueError(
            "state: expected the layout of MinMaxNormalizationHook.state_dict(): 'stats' is "
            f"{type(state['stats']).__name__}, not NormalizationStats or "
            "{'image': {'min': ..., 'max': ...}, 'pixel': {...}}."
        ) from None
    counts = {}
    for name in ("num_values", "num_nonfinite"):
        c = state.get(name)
        c = {} if c is None else c
        if not isinstance(c, Mapping):
            raise ValueError(
                f"state['{name}'] is {c!r} ({type(c).__name__}); expected a dict of counts "
                "{'image': n, 'pixel': n}, as state_dict() writes (or leave it out)."
            )
        counts[name] = {w: _host_count(f"state['{name}']['{w}']", c.get(w, 0)) for w in _WHICH}
    checked_thresholds = {
        w: validation.check_threshold(f"state['{w}_threshold']", t)
        for w, t in zip(_WHICH, thresholds, strict=True)
    }
    keys = {w: (f"stats.{w}.min", f"stats.{w}.max") for w in pairs}
    return Snapshot(
        stats=validation.checked_stats("state", pairs, keys),
        thresholds=checked_thresholds,
        **counts,
    )


# -- JSON metadata --------------------------------------------------------------------------


def to_metadata(snapshot: Snapshot) -> dict[str, float | None]:
    """anomalib's deployment metadata, in raw-score units (see ``hook.metadata``)."""
    stats = snapshot.stats
    meta: dict[str, float | None] = {
        "image_threshold": snapshot.thresholds[IMAGE],
        "pixel_threshold": snapshot.thresholds[PIXEL],
    }
    if snapshot.stats_mode == "shared":
        meta["min"], meta["max"] = (_finite(v) for v in stats[IMAGE])
    else:
        meta["pred_scores.min"], meta["pred_scores.max"] = (_finite(v) for v in stats[IMAGE])
        meta["anomaly_maps.min"], meta["anomaly_maps.max"] = (_finite(v) for v in stats[PIXEL])
    return meta


def to_json(snapshot: Snapshot, path: str | os.PathLike | None = None) -> str:
    """``to_metadata(snapshot)`` as JSON; written to ``path`` when given."""
    text = json.dumps(to_metadata(snapshot), indent=2)
    if path is not None:
        with open(path, "w") as f:
            f.write(text + "\n")
    return text


def from_json(source: str | os.PathLike | Mapping) -> Snapshot:
    """``to_json`` output or anomalib's metadata (a path, JSON text or a dict), checked.

    The snapshot holds the thresholds the metadata has, and its layout as ``stats_mode``.
    """
    if isinstance(source, Mapping):
        meta = source
    elif isinstance(source, (str, bytes, bytearray)) and source.lstrip()[:1] in (
        "{",
        "[",
        b"{",
        b"[",
    ):
        meta = _parse_json(source, "the JSON text given")
    elif isinstance(source, (str, bytes, os.PathLike)):
        with open(source, "rb") as f:
            meta = _parse_json(f.read(), f"'{os.fsdecode(source)}'")
    else:
        # An int would be opened as a file descriptor, and closed.
        raise ValueError(
            f"metadata: expected a path, a JSON string or a dict, got {type(source).__name__}."
        )
    if not isinstance(meta, Mapping):
        raise ValueError(
            f"metadata: expected a JSON object with 'min'/'max' (or 'pred_scores.min', "
            f"'anomaly_maps.min') and thresholds, got {type(meta).__name__}; pass the "
            "output of MinMaxNormalizationHook.to_json() or anomalib's metadata.json."
        )
    meta = dict(meta)
    if "min" in meta and "max" in meta:
        keys = {IMAGE: ("min", "max"), PIXEL: ("min", "max")}
        mode: StatsMode = "shared"
    elif "pred_scores.min" in meta or "anomaly_maps.min" in meta:
        keys = {
            IMAGE: ("pred_scores.min", "pred_scores.max"),
            PIXEL: ("anomaly_maps.min", "anomaly_maps.max"),
        }
        mode = "separate"
    else:
        raise ValueError(
            f"metadata: no 'min'/'max' (or 'pred_scores.min', 'anomaly_maps.min') keys "
            f"among {sorted(map(str, meta))}; export it with MinMaxNormalizationHook.to_json()."
        )
    thresholds = {
        w: validation.check_threshold(f"metadata '{w}_threshold'", meta[f"{w}_threshold"])
        for w in _WHICH
        if f"{w}_threshold" in meta
    }
    pairs = {w: _pair_from(meta, *k) for w, k in keys.items()}
    return Snapshot(
        stats=validation.checked_stats("metadata", pairs, keys),
        thresholds=thresholds,
        stats_mode=mode,
    )


# -- helpers --------------------------------------------------------------------------------


def host_pairs(stats: NormalizationStats) -> dict[str, tuple[object, object]]:
    """The statistics' leaves on the host (one transfer), still unchecked."""
    leaves = [stats.image.min, stats.image.max, stats.pixel.min, stats.pixel.max]
    if any(validation.is_tracer(v) for v in leaves):
        raise ValueError(
            "stats: got traced values; call set_stats outside jit, with the statistics "
            "your jitted step returned."
        )
    host = [_fetch(v) for v in leaves]
    return {IMAGE: (host[0], host[1]), PIXEL: (host[2], host[3])}


def _fetch(v):
    if isinstance(v, jax.Array):
        if not v.is_fully_addressable and v.is_fully_replicated:
            v = v.addressable_data(0)
        return np.asarray(jax.device_get(v))
    return v


def _parse_json(text: str | bytes, where: str):
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(
            f"metadata: {where} is not valid JSON ({e}); pass the output of "
            "MinMaxNormalizationHook.to_json() or anomalib's metadata.json."
        ) from None


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _host_count(name: str, value) -> int:
    value = np.asarray(value)
    if value.ndim or value.dtype.kind not in "iu" or int(value) < 0:
        raise ValueError(f"{name} is {value!r}; expected a count (an integer >= 0).")
    return int(value)


def _pair_from(meta: Mapping, lo_key: str, hi_key: str) -> tuple[object, object]:
    lo, hi = meta.get(lo_key), meta.get(hi_key)
    if lo is None and hi is None:
        return math.inf, -math.inf
    if lo is None or hi is None:
        missing = lo_key if lo is None else hi_key
        raise ValueError(
            f"metadata: '{missing}' is missing or null while its pair is set; export the "
            "statistics together with MinMaxNormalizationHook.to_json()."
        )
    return lo, hi
