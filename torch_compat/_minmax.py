"""``MinMax``: the statistics as a torchmetrics ``Metric``, where Lightning checkpoints them.

Also the callback's access to whatever ``pl_module.normalization_metrics`` holds: ours, or
anomalib's own ``MinMax`` metric, which anomalib 0.7's ``AnomalyModule.load_state_dict`` puts
on the module whenever a state dict has ``normalization_metrics.max``. Any object whose
``min`` and ``max`` are one-element tensors (buffers or torchmetrics states) will do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torchmetrics

from jaxnorm import MinMax as JaxMinMax
from jaxnorm._src.stats import IMAGE, PIXEL
from jaxnorm._src.validation import StatsMode, check_stats_mode
from torch_compat._dlpack import to_jax, to_torch
from torch_compat._tensors import write_in_place

_SHARED_STATES = ("min", "max")
_PIXEL_STATES = ("pixel_min", "pixel_max")
ATTRIBUTE = "normalization_metrics"


class ExplainedKey(str):
    """A state-dict key that prints with what to do about it.

    Torch applies the caller's ``strict`` to ``missing_keys``/``unexpected_keys`` after every
    module has loaded, and words its error with ``f'"{key}"'``. Reporting our keys as
    ``ExplainedKey`` keeps them plain keys for code (equal to, and hashed as, the key) and puts
    the explanation in torch's own strict-loading error.
    """

    def __new__(cls, key: str, explanation: str) -> ExplainedKey:
        self = super().__new__(cls, key)
        self.explanation = explanation
        return self

    def __format__(self, spec: str) -> str:
        return format(f"{str(self)} ({self.explanation})", spec)

    def __reduce__(self):
        return (str, (str(self),))  # pickles (and deep-copies) as the plain key


_MISSING_EXPLANATION = (
    "this checkpoint holds no normalization statistics; it was saved without "
    "MinMaxNormalizationCallback (or before any validation). Load its weights without "
    "them (`model.load_state_dict(state_dict, strict=False)`, or `model.strict_loading = "
    "False` with Lightning >= 2.2), then run `trainer.validate(model, ...)` with the "
    "callback to compute the statistics before testing or predicting"
)


_SEPARATE_EXPLANATION = (
    "this checkpoint holds separate image and pixel normalization statistics; create "
    "MinMaxNormalizationCallback(stats='separate') to load it"
)


class MinMax(torchmetrics.Metric):
    """``pl_module.normalization_metrics``: anomalib's ``MinMax`` metric, computed by jaxnorm.

    A ``torchmetrics.Metric`` like anomalib 0.3.6-0.7's: the states ``min`` (+inf when empty)
    and ``max`` (-inf) are persistent, so a Lightning checkpoint holds them under
    ``normalization_metrics.min`` and ``normalization_metrics.max``, anomalib's keys;
    checkpoints load both ways. ``update(predictions)`` folds a tensor in (through
    ``jaxnorm.MinMax``, so NaN and +-inf are skipped instead of poisoning the statistics),
    ``compute()`` returns ``(min, max)``, ``metric(predictions)`` (``forward``) updates and
    returns the batch's ``(min, max)``, and ``reset()`` empties it. Under DDP the states
    reduce with ``min`` and ``max``.

    With ``stats="separate"`` two more persistent states hold the pixel statistics:
    ``pixel_min`` and ``pixel_max`` (``update(..., pixel=maps)`` folds into them); ``min`` and
    ``max`` then hold the image statistics. A checkpoint without the pixel keys (anomalib's,
    or one saved with shared statistics) loads into a separate ``MinMax`` with the one
    statistic applied to both, as anomalib applied it. A checkpoint with the pixel keys does
    not load into a shared one.

    ``MinMaxNormalizationCallback`` writes the statistics here at each validation epoch end
    and reads them back before test and predict. Loading a state dict writes the states in
    place (device and dtype kept) and checks that each value is one number; whether the
    values are usable (finite, ``max >= min``) is checked when the callback reads them.

    Args:
      stats: ``"shared"`` (anomalib's two states) or ``"separate"`` (two more for pixels).
      **kwargs: ``torchmetrics.Metric``'s options.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    min: torch.Tensor
    max: torch.Tensor

    def __init__(self, stats: StatsMode = "shared", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("min", torch.tensor(math.inf), dist_reduce_fx="min", persistent=True)
        self.add_state("max", torch.tensor(-math.inf), dist_reduce_fx="max", persistent=True)
        # Where the values came from, for error messages: a state dict, or this process.
        self.loaded_from_checkpoint = False
        self.configure(stats)

    @property
    def stats_mode(self) -> StatsMode:
        return "separate" if "pixel_min" in self._defaults else "shared"

    def configure(self, stats: StatsMode) -> None:
        """Adds the pixel states for ``"separate"`` statistics, filled from ``min``/``max``.

        Raises:
          ValueError: asked for ``"shared"`` when the pixel states are there; dropping them
            would lose the pixel statistics.
        """
        check_stats_mode(stats)
        if stats == self.stats_mode:
            return
        if stats == "shared":
            raise ValueError(
                "normalization_metrics holds separate image and pixel statistics "
                "(stats='separate'), but the callback was created with stats='shared'; create "
                "MinMaxNormalizationCallback(stats='separate'), or delete "
                "pl_module.normalization_metrics to start over with shared statistics."
            )
        for name, shared in zip(_PIXEL_STATES, _SHARED_STATES, strict=True):
            reduce = "min" if name == "pixel_min" else "max"
            default = torch.tensor(math.inf if reduce == "min" else -math.inf)
            self.add_state(name, default, dist_reduce_fx=reduce, persistent=True)
            setattr(self, name, getattr(self, shared).detach().clone())

    # -- torchmetrics.Metric ---------------------------------------------------------------

    def update(
        self,
        predictions: torch.Tensor | None = None,
        *args: Any,
        pixel: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """Folds the finite values of ``predictions`` into ``min``/``max`` (anomalib's call).

        Args:
          predictions: scores of any shape and real dtype.
          *args: ignored, as anomalib's metric ignores them.
          pixel: with ``stats="separate"``, maps or box scores for ``pixel_min``/``pixel_max``.
          **kwargs: ignored.
        """
        del args, kwargs
        if predictions is not None:
            self.min, self.max = _fold(self.min, self.max, predictions)
        if pixel is not None:
            if self.stats_mode != "separate":
                raise ValueError(
                    "MinMax.update(pixel=...): this metric holds shared statistics; create "
                    "MinMax(stats='separate') for separate pixel statistics, or pass the "
                    "values as `predictions`."
                )
            self.pixel_min, self.pixel_max = _fold(self.pixel_min, self.pixel_max, pixel)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min, max)``, as anomalib's metric returns them."""
        return self.min, self.max

    # -- the callback's view ---------------------------------------------------------------

    def read(self) -> dict[str, tuple[float, float]]:
        """``{"image": (min, max), "pixel": (min, max)}`` as Python floats (reads the host)."""
        pairs = stat_tensors(self, self.stats_mode)
        return {which: (float(lo), float(hi)) for which, ((_, lo), (_, hi)) in pairs.items()}

    def write(self, stats: Mapping[str, tuple[float, float]]) -> None:
        """Stores ``{"image": (min, max), "pixel": (min, max)}`` in place (device kept)."""
        write_stats(self, self.stats_mode, stats)

    def _mark_written(self) -> None:
        # Set from outside update(): compute() must not return a stale cache, nor warn that
        # update() was never called.
        self._computed = None
        self._update_count = max(self._update_count, 1)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Ours, not torchmetrics': that one replaces the states with the checkpoint's tensors
        # (device and dtype as loaded) and reports no missing keys at all.
        names = list(self._defaults)
        found = {
            name: state_dict.pop(prefix + name) for name in names if prefix + name in state_dict
        }
        stray = [prefix + name for name in _PIXEL_STATES if prefix + name in state_dict]
        for key in stray:
            state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # Torch raises on these under strict loading, with the explanation (said once).
        if stray:
            unexpected_keys.extend([*stray[:-1], ExplainedKey(stray[-1], _SEPARATE_EXPLANATION)])
        missing = [prefix + name for name in _SHARED_STATES if name not in found]
        if missing:
            missing_keys.extend([*missing[:-1], ExplainedKey(missing[-1], _MISSING_EXPLANATION)])
        if self.stats_mode == "separate" and not any(name in found for name in _PIXEL_STATES):
            # A shared checkpoint (anomalib's): its one statistic applies to pixels too.
            for name, shared in zip(_PIXEL_STATES, _SHARED_STATES, strict=True):
                if shared in found:
                    found[name] = found[shared]
        bad = False
        for name, value in found.items():
            key = prefix + name
            numel = value.numel() if isinstance(value, torch.Tensor) else None
            if numel != 1:
                shape = tuple(value.shape) if numel is not None else type(value).__name__
                error_msgs.append(
                    f"{key}: checkpoint value {shape!s} is not one number; normalization "
                    "statistics are 0-d tensors: load the checkpoint this model saved."
                )
                bad = True
        if bad:
            return
        for name, value in found.items():
            write_in_place(getattr(self, name), value.detach())
        if found:
            self.loaded_from_checkpoint = True
            self._mark_written()

    def extra_repr(self) -> str:
        if any(t.device.type == "meta" for t in (self.min, self.max)):
            return "meta"
        parts = [f"min={float(self.min):g}, max={float(self.max):g}"]
        if self.stats_mode == "separate":
            parts.append(
                f"pixel_min={float(self.pixel_min):g}, pixel_max={float(self.pixel_max):g}"
            )
        return ", ".join(parts)


def _fold(lo: torch.Tensor, hi: torch.Tensor, values: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(values, torch.Tensor):
        raise ValueError(
            f"MinMax.update: expected a torch.Tensor, got {type(values).__name__}; pass the "
            "scores as a tensor."
        )
    batch = JaxMinMax.empty().update(to_jax(values, name="MinMax.update(predictions)"))
    # Merged on the torch side: the states stay torch-owned, on their device and dtype.
    return torch.minimum(lo, to_torch(batch.min, lo)), torch.maximum(hi, to_torch(batch.max, hi))


# -- any normalization_metrics: ours or anomalib's ------------------------------------------


def _is_stat(value: Any) -> bool:
    # Tensors of other shapes pass here: reading them names the key and shape.
    return isinstance(value, torch.Tensor)


def stat_tensors(
    metrics: Any, stats_mode: StatsMode
) -> dict[str, tuple[tuple[str, torch.Tensor], tuple[str, torch.Tensor]]]:
    """``{"image": ((min_key, min), (max_key, max)), "pixel": ...}``: the tensors, not copies.

    For separate statistics held in a metric with only ``min``/``max`` the one pair serves
    both, as it does for a shared checkpoint.

    Raises:
      AttributeError: ``metrics`` holds no ``min`` and ``max`` tensors.
    """
    lo, hi = getattr(metrics, "min", None), getattr(metrics, "max", None)
    if not (_is_stat(lo) and _is_stat(hi)):
        found = ", ".join(
            f"'{name}' missing"
            if v is None
            else f"'{name}': {type(v).__name__}"
            + (f" of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else "")
            for name, v in (("min", lo), ("max", hi))
        )
        raise AttributeError(
            f"pl_module.{ATTRIBUTE} is a {type(metrics).__module__}.{type(metrics).__qualname__} "
            f"without tensors 'min' and 'max' ({found}); MinMaxNormalizationCallback "
            f"keeps its statistics there. Delete the attribute (the callback then attaches a "
            f"torch_compat.MinMax), or set `pl_module.{ATTRIBUTE} = torch_compat.MinMax()`."
        )
    image = ((f"{ATTRIBUTE}.min", lo), (f"{ATTRIBUTE}.max", hi))
    pixel = image
    if stats_mode == "separate":
        plo, phi = getattr(metrics, "pixel_min", None), getattr(metrics, "pixel_max", None)
        if _is_stat(plo) and _is_stat(phi):
            pixel = ((f"{ATTRIBUTE}.pixel_min", plo), (f"{ATTRIBUTE}.pixel_max", phi))
    return {IMAGE: image, PIXEL: pixel}


def write_stats(
    metrics: Any, stats_mode: StatsMode, stats: Mapping[str, tuple[float, float]]
) -> None:
    """Writes ``{"image": (min, max), "pixel": (min, max)}`` into ``metrics``' tensors.

    In place, except collected statistics into a half-precision state (the module went
    through ``.half()`` or ``.to(torch.bfloat16)``): anomalib's ``MinMax.update`` assigns
    ``torch.min(state, batch_min)``, which promotes such a state to the scores' float32, so
    they are stored in a new float32 tensor there, unrounded, as anomalib stores them. The
    empty pair (+inf, -inf: no batch was folded, anomalib's state stays as it was) is
    written in place.

    Raises:
      ValueError: separate statistics that differ, into a metric without pixel states.
    """
    pairs = stat_tensors(metrics, stats_mode)
    if pairs[PIXEL] is pairs[IMAGE] and stats_mode == "separate" and stats[IMAGE] != stats[PIXEL]:
        raise _one_pair_error(metrics)
    for which in (IMAGE, PIXEL) if pairs[PIXEL] is not pairs[IMAGE] else (IMAGE,):
        lo, hi = stats[which]
        for (key, tensor), value in zip(pairs[which], (lo, hi), strict=True):
            if lo <= hi and tensor.dtype in (torch.float16, torch.bfloat16):
                promoted = torch.full(
                    tensor.shape, value, dtype=torch.float32, device=tensor.device
                )
                setattr(metrics, key.rsplit(".", 1)[-1], promoted)
            else:
                write_in_place(tensor, value)
    if isinstance(metrics, MinMax):
        metrics.loaded_from_checkpoint = False
    if isinstance(metrics, torchmetrics.Metric):
        metrics._computed = None
        metrics._update_count = max(metrics._update_count, 1)


def check_holds_separate(metrics: Any, stats_mode: StatsMode) -> None:
    """Raises when separate statistics are to be collected into a metric that holds one pair.

    Raises:
      ValueError: naming the metric's class and what to do.
    """
    if stats_mode == "separate":
        pairs = stat_tensors(metrics, stats_mode)
        if pairs[PIXEL] is pairs[IMAGE]:
            raise _one_pair_error(metrics)


def _one_pair_error(metrics: Any) -> ValueError:
    return ValueError(
        f"pl_module.{ATTRIBUTE} is a {type(metrics).__qualname__}, which holds one min/max "
        "pair, but the callback collects separate image and pixel statistics "
        f"(stats='separate'); set `pl_module.{ATTRIBUTE} = "
        "torch_compat.MinMax(stats='separate')` before validating, or use stats='shared'."
    )
