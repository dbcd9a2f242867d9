"""The F1 thresholds of one validation epoch: which output keys feed them, their checks, what
the host keeps between batches, and the thresholds at epoch end.

The hook and the Lightning adapters fold a batch's F1 states in the same jitted dispatch as
its statistics (``fold.fold``, exact ``F1AdaptiveThreshold`` arrays on the device). Each
batch's stored scores and label codes come back from that dispatch, and ``EpochF1`` keeps
them (a list append: no host read), with how many batches fed each threshold. At epoch end
``EpochF1.compute`` turns them into thresholds, across processes with the hook's reducer
(every decision there is taken on global counts, so every process makes the same
collective calls).

The keys are anomalib's: image scores ``pred_scores`` with ``label`` (one per image), maps
``anomaly_maps`` with ``mask`` (one per pixel), as anomalib 0.7's ``AnomalyModule`` reads
its validation outputs (``_collect_outputs``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np

from jaxnorm._src import f1_fold
from jaxnorm._src.f1_state import F1AdaptiveThreshold
from jaxnorm._src.stats import IMAGE, PIXEL

logger = logging.getLogger("jaxnorm")

# (threshold, scores key, labels key), in the order of HookState.f1.
PAIRS = ((IMAGE, "pred_scores", "label"), (PIXEL, "anomaly_maps", "mask"))
LABEL_KEYS = {label: score for _, score, label in PAIRS}  # label key -> its scores' key
THRESHOLD_MODES = (None, "f1")


def check_mode(value) -> str | None:
    if value not in THRESHOLD_MODES:
        raise ValueError(
            f"thresholds={value!r}: expected None (set the thresholds yourself) or 'f1' "
            "(anomalib's F1 adaptive thresholds, computed during validation)."
        )
    return value


def empty_states() -> tuple:
    """The image and pixel states' arrays before any batch (exact mode)."""
    return (f1_fold.empty_fields(0, 0), f1_fold.empty_fields(0, 0))


def routes(outputs: Mapping) -> tuple[tuple[int, str, str], ...]:
    """``((index, scores key, labels key), ...)``: the thresholds a batch can feed, those
    whose scores and labels it both holds."""
    return tuple(
        (i, score, label)
        for i, (_, score, label) in enumerate(PAIRS)
        if score in outputs and label in outputs
    )


def check_pairs(outputs: Mapping, f1_routes) -> None:
    """Each label array holds one label per score, along the same leading (batch) axis.

    Raises:
      ValueError: naming both keys, their shapes and what to do.
    """
    for _, score, label in f1_routes:
        s, y = np.shape(outputs[score]), np.shape(outputs[label])
        if int(np.prod(s)) != int(np.prod(y)) or (s[:1] != y[:1] and s and y):
            raise ValueError(
                f"thresholds: '{label}' has shape {y} but '{score}' has shape {s}; the F1 "
                f"threshold needs one label per score, along the same batch axis (for "
                f"'{score}' of shape (N, 1, H, W) a '{label}' of (N, H, W) or (N, 1, H, W))."
            )


def hook_routes(outputs: Mapping, epoch: EpochF1) -> tuple[tuple[int, str, str], ...]:
    """The routes of a batch for ``MinMaxNormalizationHook(thresholds="f1")``: anomalib 0.7's
    rules, checked.

    Every batch needs ``pred_scores`` and ``label`` (the image threshold). Maps with masks
    feed the pixel threshold; an epoch whose batches have none takes the image threshold for
    pixels (``_compute_adaptive_threshold``), so the batches of one epoch must agree.

    Raises:
      ValueError: a key is missing, or the batches of the epoch disagree, naming the key.
    """
    for key, what in (
        ("label", "one label per image in 'label' (1 anomalous, 0 normal)"),
        ("pred_scores", "the image scores in 'pred_scores' (anomalib takes each map's max)"),
    ):
        if key not in outputs:
            raise ValueError(
                f"thresholds='f1': validation outputs without '{key}' (keys: "
                f"{sorted(map(str, outputs))}). The image threshold needs {what}, as "
                "anomalib's validation outputs have; add it to your eval step's outputs, or "
                "create the hook with thresholds=None and set hook.image_threshold yourself."
            )
    found = routes(outputs)
    pixel = len(found) == 2
    if epoch.pixel is not None and pixel != epoch.pixel:
        had, has = ("had", "has not") if epoch.pixel else ("had not", "has")
        raise ValueError(
            f"thresholds='f1': validation batch {sum(epoch.batches[:1])} of this epoch "
            f"{has} both 'anomaly_maps' and 'mask' while the earlier batches {had}; the "
            "pixel threshold needs the masks of every batch with maps (or of none: then "
            "it is the image threshold, as anomalib 0.7 does without masks)."
        )
    check_pairs(outputs, found)
    return found


class Result(NamedTuple):
    """What ``EpochF1.compute`` found, over every process.

    Attributes:
      thresholds: ``{"image": t, "pixel": t}``, ``None`` where no score was counted (no
        batch fed it, or every batch was rejected). Labels other than 0 and 1 count as
        normal, as in anomalib 2.7's metric (see ``other_labels``).
      batches: how many batches fed each threshold.
      other_labels: how many counted labels were neither 0 nor 1.
    """

    thresholds: dict
    batches: dict
    other_labels: dict


class EpochF1:
    """What the host keeps of the F1 thresholds between batches: per threshold, the chunks
    (each batch's stored scores and label codes) and how many batches fed it; and whether
    this epoch's batches had masks (``hook_routes``)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.chunks: tuple[list, list] = ([], [])
        self.batches = [0, 0]
        self.pixel: bool | None = None

    def add(self, f1_routes, chunks) -> None:
        """Keeps a folded batch's chunks (``fold.fold``'s second result)."""
        for (i, _, _), chunk in zip(f1_routes, chunks, strict=True):
            self.chunks[i].append(chunk)
            self.batches[i] += 1
        self.pixel = any(i == 1 for i, _, _ in f1_routes)

    def compute(self, fixed: tuple, reducer=None) -> Result:
        """The thresholds of the epoch (``HookState.f1`` as ``fixed``; ``()``: none fed).

        Reads each state's counts on the host. With ``reducer`` (see ``jaxnorm.Reducer``)
        every process must call it: one all-reduce of the batch and label counts, then the
        collectives of ``F1AdaptiveThreshold.compute`` for each threshold to compute.
        """
        fixed = fixed or empty_states()
        counts = np.zeros((2, 3), np.int64)  # per threshold: batches, values, other labels
        for i, state in enumerate(fixed):
            n_zero, n_pos, n_other = np.asarray(jax.device_get(state[0])).sum(0, dtype=np.int64)
            counts[i] = (self.batches[i], n_zero + n_pos + n_other, n_other)
        if reducer is not None:
            empty = np.zeros(0, np.float32)
            _, _, total = reducer(empty, empty, counts.reshape(-1))
            counts = np.asarray(total, np.int64).reshape(2, 3)
        thresholds = {}
        for i, (which, _, _) in enumerate(PAIRS):
            value = None
            n_batches, n_values, _ = (int(x) for x in counts[i])
            if n_batches and n_values:
                state = F1AdaptiveThreshold(
                    *fixed[i], chunks=tuple(self.chunks[i]), mode="exact", nonfinite="omit"
                )
                value = float(state.compute(reducer))
            thresholds[which] = value
        names = [which for which, _, _ in PAIRS]
        return Result(
            thresholds,
            dict(zip(names, (int(x) for x in counts[:, 0]), strict=True)),
            dict(zip(names, (int(x) for x in counts[:, 2]), strict=True)),
        )


def set_hook_thresholds(hook, result: Result) -> None:
    """anomalib 0.7's ``_compute_adaptive_threshold`` on ``hook``'s thresholds: the image
    threshold, and the pixel one from maps with masks, else the image one.

    Labels other than 0 and 1 are refused: anomalib 2.7's metric counts them as normal, so
    a 0/255 mask would have no anomaly at all, and the threshold would be the top score.

    Raises:
      ValueError: naming the key that held such labels, after setting the thresholds whose
        labels were all 0 and 1 (the other stays as it was).
    """
    bad = {which: n for which, n in result.other_labels.items() if n}
    image, pixel = (None if w in bad else result.thresholds[w] for w in (IMAGE, PIXEL))
    if image is not None:
        hook.image_threshold = image
    if not result.batches[PIXEL] and image is not None:
        logger.info(
            "thresholds='f1': no validation batch had both 'anomaly_maps' and 'mask', so the "
            "pixel threshold is the image threshold (as anomalib 0.7 does without masks)."
        )
        pixel = image
    if pixel is not None:
        hook.pixel_threshold = pixel
    if bad:
        which, n = next(iter(bad.items()))
        raise ValueError(
            f"thresholds='f1': '{'label' if which == IMAGE else 'mask'}' held {n} value(s) "
            f"other than 0 and 1 this epoch, so the {which} threshold was left as it was "
            "(anomalib's metric would count them as normal: a 0/255 mask has no anomaly). "
            "Give labels as bool or 0/1 (e.g. mask > 0)."
        )
