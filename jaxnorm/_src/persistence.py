"""Saving and loading the hook's thresholds and statistics: state dicts and JSON metadata.

Everything that enters from outside (a state dict, JSON metadata, ``set_stats``, a reducer's
output, anomalib 2's buffers) is checked by one path, ``checked_stats`` over
``validation.loaded_stats``, so a bad value is reported the same way wherever it comes from:
the source, the key and the value.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxnorm._src import hook_step, validation
from jaxnorm._src.outputs import IMAGE, PIXEL, NormalizationStats, StatsMode

if TYPE_CHECKING:
    from jaxnorm._src.hook import MinMaxNormalizationHook

_F32_MAX = float(np.finfo(np.float32).max)
_WHICH = (IMAGE, PIXEL)


# -- state dicts ----------------------------------------------------------------------------


def state_dict(hook: MinMaxNormalizationHook) -> dict[str, Any]:
    """``hook.state_dict()``: see ``MinMaxNormalizationHook.state_dict``."""
    counts = {"num_values": hook.num_values, "num_nonfinite": hook.num_nonfinite}
    hook.host_stats()  # reads (and caches) the statistics once, raising pending errors
    return {
        "stats": hook.stats,
        "image_threshold": np.float64(hook.image_threshold),
        "pixel_threshold": np.float64(hook.pixel_threshold),
        **{name: {w: np.uint64(c[w]) for w in _WHICH} for name, c in counts.items()},
    }


def load_state_dict(hook: MinMaxNormalizationHook, state: Mapping[str, Any]) -> None:
    """``hook.load_state_dict(state)``: everything is checked before anything changes."""
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
    image_threshold, pixel_threshold = (
        check_threshold(f"state['{w}_threshold']", t)
        for w, t in zip(_WHICH, thresholds, strict=True)
    )
    host = checked_stats("state", pairs, {w: (f"stats.{w}.min", f"stats.{w}.max") for w in pairs})
    # Everything is checked: nothing below raises, so a bad state changes nothing.
    hook._set_state(hook_step.HookState.initial(None, **counts))
    hook._install(host)
    separate_if_differ(hook, host)
    hook.image_threshold = image_threshold
    hook.pixel_threshold = pixel_threshold


def separate_if_differ(hook: MinMaxNormalizationHook, host: Mapping[str, tuple]) -> None:
    """Makes a shared hook separate when its new image and pixel statistics differ (saved
    by a separate hook): shared mode folds, saves and exports one pair, and would drop the
    pixel statistics."""
    if host[IMAGE] != host[PIXEL]:
        hook.stats_mode = "separate"


# -- JSON metadata --------------------------------------------------------------------------


def metadata(hook: MinMaxNormalizationHook) -> dict[str, float | None]:
    """``hook.metadata()``: anomalib's deployment metadata, in raw-score units."""
    stats = hook.host_stats()
    meta: dict[str, float | None] = {
        "image_threshold": hook.image_threshold,
        "pixel_threshold": hook.pixel_threshold,
    }
    if hook.stats_mode == "shared":
        meta["min"], meta["max"] = (_finite(v) for v in stats[IMAGE])
    else:
        meta["pred_scores.min"], meta["pred_scores.max"] = (_finite(v) for v in stats[IMAGE])
        meta["anomaly_maps.min"], meta["anomaly_maps.max"] = (_finite(v) for v in stats[PIXEL])
    return meta


def to_json(hook: MinMaxNormalizationHook, path: str | os.PathLike | None = None) -> str:
    """``metadata(hook)`` as JSON; written to ``path`` when given."""
    text = json.dumps(metadata(hook), indent=2)
    if path is not None:
        with open(path, "w") as f:
            f.write(text + "\n")
    return text


def load_json(hook: MinMaxNormalizationHook, source: str | os.PathLike | Mapping) -> None:
    """``hook.load_json(source)``: see ``MinMaxNormalizationHook.load_json``."""
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
        w: check_threshold(f"metadata '{w}_threshold'", meta[f"{w}_threshold"])
        for w in _WHICH
        if f"{w}_threshold" in meta
    }
    pairs = {w: _pair_from(meta, *k) for w, k in keys.items()}
    hook._install(checked_stats("metadata", pairs, keys))
    for w, t in thresholds.items():
        hook._set_threshold(w, t)
    hook.stats_mode = mode


# -- checks of what comes from outside ------------------------------------------------------


def check_threshold(name: str, value) -> float:
    """A threshold from a setter, a state dict or JSON, as a finite float in float32's range."""
    value = validation.host_scalar(name, value)
    if not isinstance(value, float):
        raise ValueError(f"{name}: pass a concrete number, not a traced value.")
    if abs(value) > _F32_MAX:
        raise ValueError(
            f"{name} is {value}, beyond float32's range (+-{_F32_MAX:.4g}), where the "
            "statistics live; pass a threshold in raw-score units."
        )
    return value


def checked_stats(
    source: str,
    pairs: Mapping[str, tuple[object, object]],
    keys: Mapping[str, tuple[str, str]] | None = None,
) -> dict[str, tuple[float, float]]:
    """Checks ``{"image": (lo, hi), "pixel": (lo, hi)}`` that come from outside.

    ``keys`` names each pair's values in ``source`` (default ``"image.min"``, ...).
    """
    host = {}
    for which, (lo, hi) in pairs.items():
        lo_key, hi_key = (keys or {}).get(which, (f"{which}.min", f"{which}.max"))
        host[which] = validation.loaded_stats(source, lo_key, lo, hi_key, hi)
    return host


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
