"""``MinMax``: the statistics as persistent torch buffers, where Lightning checkpoints them."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from jaxnorm._src.outputs import IMAGE, PIXEL, StatsMode, check_stats_mode

_PIXEL_BUFFERS = ("pixel_min", "pixel_max")


class MinMax(nn.Module):
    """``pl_module.normalization_metrics``: anomalib's statistics, stored for checkpoints.

    The buffers ``min`` (+inf when empty) and ``max`` (-inf) are persistent, so a Lightning
    checkpoint holds them under ``normalization_metrics.min`` and ``normalization_metrics.max``:
    the keys of anomalib 0.3.6 to 0.7's ``MinMax`` metric. Checkpoints load both ways.

    With ``stats="separate"`` two more persistent buffers hold the pixel statistics:
    ``pixel_min`` and ``pixel_max``; ``min`` and ``max`` then hold the image statistics (from
    ``pred_scores``). A checkpoint without the pixel keys (anomalib's, or one saved with
    shared statistics) loads into a separate ``MinMax`` with the one statistic applied to both,
    as anomalib applied it. A checkpoint with the pixel keys does not load into a shared one.

    The module only stores the statistics; ``MinMaxNormalizationCallback`` computes them with
    jaxnorm, writes them here at each validation epoch end and reads them back before test
    and predict. Create one in your LightningModule's ``__init__`` to load checkpoints with
    ``LightningModule.load_from_checkpoint``: the callback keeps it.

    Args:
      stats: ``"shared"`` (anomalib's two buffers) or ``"separate"`` (two more for pixels).
    """

    min: torch.Tensor
    max: torch.Tensor

    def __init__(self, stats: StatsMode = "shared") -> None:
        super().__init__()
        self.register_buffer("min", torch.tensor(math.inf))
        self.register_buffer("max", torch.tensor(-math.inf))
        self.configure(stats)

    @property
    def stats_mode(self) -> StatsMode:
        return "separate" if "pixel_min" in self._buffers else "shared"

    def configure(self, stats: StatsMode) -> None:
        """Adds the pixel buffers for ``"separate"`` statistics, filled from ``min``/``max``.

        Raises:
          ValueError: asked for ``"shared"`` when the pixel buffers are there; dropping them
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
        self.register_buffer("pixel_min", self.min.detach().clone())
        self.register_buffer("pixel_max", self.max.detach().clone())

    def _buffers_of(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if which == PIXEL and self.stats_mode == "separate":
            return self._buffers["pixel_min"], self._buffers["pixel_max"]
        return self.min, self.max

    def read(self) -> dict[str, tuple[float, float]]:
        """``{"image": (min, max), "pixel": (min, max)}`` as Python floats."""
        return {which: tuple(float(b) for b in self._buffers_of(which)) for which in (IMAGE, PIXEL)}

    @torch.no_grad()
    def write(self, stats: Mapping[str, tuple[float, float]]) -> None:
        """Stores ``{"image": (min, max), "pixel": (min, max)}`` in place (device kept)."""
        for which in (IMAGE, PIXEL) if self.stats_mode == "separate" else (IMAGE,):
            lo_buf, hi_buf = self._buffers_of(which)
            lo, hi = stats[which]
            lo_buf.fill_(lo)
            hi_buf.fill_(hi)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min, max)``, as anomalib's metric returns them."""
        return self.min, self.max

    def version(self) -> tuple | None:
        """Changes whenever a buffer is replaced or written in place; ``None``: unknown."""
        token = []
        for b in self._buffers.values():
            if b is None or b.is_inference():  # inference tensors keep no version counter
                return None
            token.append((b, b._version))
        return tuple(token)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        pixel_keys = [prefix + name for name in _PIXEL_BUFFERS]
        if self.stats_mode == "separate" and not any(k in state_dict for k in pixel_keys):
            # A shared checkpoint (anomalib's): its one statistic applies to pixels too.
            for name, key in zip(_PIXEL_BUFFERS, pixel_keys, strict=True):
                shared_key = prefix + name[len("pixel_") :]
                if shared_key in state_dict:
                    if key in missing_keys:
                        missing_keys.remove(key)
                    with torch.no_grad():
                        self._buffers[name].copy_(state_dict[shared_key])
        elif (
            self.stats_mode == "shared" and strict and any(k in unexpected_keys for k in pixel_keys)
        ):
            for key in pixel_keys:
                if key in unexpected_keys:
                    unexpected_keys.remove(key)
            error_msgs.append(
                f"{prefix}pixel_min/pixel_max: this checkpoint holds separate image and pixel "
                "normalization statistics; create MinMaxNormalizationCallback(stats='separate') "
                "to load it."
            )

    def extra_repr(self) -> str:
        parts = [f"min={float(self.min):g}, max={float(self.max):g}"]
        if self.stats_mode == "separate":
            lo, hi = self._buffers_of(PIXEL)
            parts.append(f"pixel_min={float(lo):g}, pixel_max={float(hi):g}")
        return ", ".join(parts)
