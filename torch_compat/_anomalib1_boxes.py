"""The ``box_scores`` entry of anomalib 1.1.1+'s per-output design, which the 1.x adapter keeps
apart from the hook's image and pixel statistics: a second small hook folds validation box
scores and normalizes test box scores (anomalib's post-processor adds them in test and
predict only, where anomalib's empty box statistics make every one 0.5).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from anomalib.metrics import MinMax

from jaxnorm import MinMax as JaxMinMax
from jaxnorm import MinMaxNormalizationHook
from jaxnorm._src.hook import NonFinitePolicy
from jaxnorm._src.stats import IMAGE
from jaxnorm._src.validation import loaded_stats
from torch_compat import _steady
from torch_compat._allreduce import epoch_reducer
from torch_compat._anomalib1_design import entry_pair
from torch_compat._anomalib1_store import store
from torch_compat._dlpack import host_to_torch
from torch_compat._exchange import JaxView
from torch_compat._lifecycle import validation_epoch_end

SOURCE = "pl_module"  # errors name the source and the state-dict key


class BoxScoresWarning(UserWarning):
    """anomalib >= 1.1.1 normalizes ``box_scores`` with statistics that validation never fills:
    every box score becomes 0.5. This callback gives the same outputs, and says so once."""


class Boxes:
    """The ``box_scores`` entry of the per-output design: its own hook folds the box scores
    of validation outputs (none in anomalib's models but a detector's), and normalizes test
    box scores with them and the pixel threshold. Empty statistics give anomalib's 0.5."""

    def __init__(self, nonfinite: NonFinitePolicy) -> None:
        self.hook = MinMaxNormalizationHook(stats="shared", nonfinite=nonfinite, reducer=None)
        self.warned = False
        # The values self.hook was given, and its statistics then (see normalize).
        self.loaded: tuple[float, float, float] | None = None
        self.holds: object = None

    def start_epoch(self) -> None:
        self.hook.reducer = epoch_reducer()
        self.hook.on_validation_epoch_start()

    def fold(self, boxes: Any) -> None:
        _steady.fold_validation_batch(self.hook, {"box_scores": boxes}, None)

    def end_epoch(self, metric: MinMax, fed: torch.dtype | None) -> None:
        """Stores the epoch's box statistics in anomalib's ``box_scores`` metric (all-reduced
        under DDP: every rank calls this, boxes or not; ``fed``: see ``_anomalib1_store``),
        then raises what the epoch held."""
        with validation_epoch_end(self.hook) as stats:
            store(metric, stats[IMAGE], fed)

    def normalize(self, boxes: Any, metric: MinMax, threshold: Any) -> list:
        """``boxes`` normalized with ``metric``'s statistics and the pixel threshold.

        The statistics and the threshold are read on the host at each batch, on an
        accelerator too: box scores are concatenated and split there anyway (one host round
        trip per batch with boxes), so no cache stands for their values. Cache rule: the
        hook is given them only when the values just read differ from those it was given
        (so no write, load, replacement or conversion of the metric can go unseen), or when
        its statistics are no longer the object they were then (a validation fold or reset
        since makes a new one).

        Raises:
          ValueError: statistics that are NaN, infinite (but the empty pair) or ``max <
            min``, naming the key.
        """
        (lo_key, lo), (hi_key, hi) = entry_pair(metric, "box_scores")
        lo, hi = loaded_stats(SOURCE, lo_key, lo, hi_key, hi)
        if lo > hi:  # the empty pair: validation saw no box scores
            if not self.warned:
                self.warned = True
                warnings.warn(
                    "box_scores normalized to 0.5: anomalib >= 1.1.1 normalizes them with "
                    "statistics of their own, which only validation outputs holding "
                    "box_scores fill, and its models' validation outputs hold none; this "
                    "callback gives the same outputs as anomalib's (said once per callback).",
                    BoxScoresWarning,
                    stacklevel=1,
                )
            # anomalib's (x - t) / (-inf - inf) + 0.5: 0.5 for every finite score, NaN else
            return [
                torch.where(b.isfinite(), 0.5, math.nan).to(torch.result_type(b, 0.5))
                for b in boxes
            ]
        loaded = (lo, hi, float(threshold))
        if loaded != self.loaded or self.hook.stats is not self.holds:
            self.hook.set_stats(JaxMinMax(min=lo, max=hi))
            self.hook.pixel_threshold = loaded[2]
            self.loaded, self.holds = loaded, self.hook.stats
        view = JaxView({"box_scores": boxes})
        normalized = self.hook.normalize_batch(view, boxes_on_host=True)["box_scores"]
        return [
            host_to_torch(n, b).reshape(b.shape) for n, b in zip(normalized, boxes, strict=True)
        ]

    def __getstate__(self) -> dict:
        # Copies and pickles hold no cache: they read the metric again.
        return {**self.__dict__, "loaded": None, "holds": None}
