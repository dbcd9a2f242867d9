"""anomalib 2.x's ``PostProcessor``, with its statistics and normalization computed by jaxnorm.

A drop-in for ``anomalib.post_processing.PostProcessor`` (anomalib >= 2)::

  from torch_compat.anomalib2 import PostProcessor

  model = Padim(post_processor=PostProcessor())

Needs anomalib >= 2 (``pip install "anomalib[cpu]>=2"``); for anomalib 0.x use
``torch_compat.MinMaxNormalizationCallback``.
"""

from __future__ import annotations

import copy
import copyreg
from multiprocessing.reduction import ForkingPickler
from typing import Any

_INSTALL = (
    'torch_compat.anomalib2 needs anomalib >= 2: `pip install "anomalib[cpu]>=2"` (or '
    "`anomalib[cu126]`/`anomalib[cu130]` for CUDA). For anomalib 0.x use "
    "torch_compat.MinMaxNormalizationCallback instead."
)


def _anomalib_major() -> int | None:
    import anomalib

    version = str(getattr(anomalib, "__version__", "0"))
    head = version.split(".")[0]
    return int(head) if head.isdigit() else None


try:
    _major = _anomalib_major()
except ImportError as e:
    raise ImportError(f"{_INSTALL} (importing anomalib failed: {e})") from e
if _major is None or _major < 2:
    import anomalib as _anomalib

    raise ImportError(
        f"{_INSTALL} Found anomalib {getattr(_anomalib, '__version__', '?')} at "
        f"{getattr(_anomalib, '__file__', '?')}."
    )

try:
    from anomalib.data import InferenceBatch
    from anomalib.post_processing import PostProcessor as AnomalibPostProcessor
except ImportError as e:  # pragma: no cover - a broken anomalib install
    raise ImportError(f"{_INSTALL} (importing anomalib.post_processing failed: {e})") from e

import torch  # noqa: E402

from jaxnorm._src.random_state import global_random_state_kept as _kept  # noqa: E402

with _kept():
    from torch_compat._postprocessor import MAP, SCORE, JaxState, exporting, plain

__all__ = ["AnomalibPostProcessor", "PostProcessor"]

_STATE = "_jaxnorm"  # the instance attribute that holds the jaxnorm side (a JaxState)


class PostProcessor(AnomalibPostProcessor):
    """anomalib 2's ``PostProcessor`` whose min/max statistics and normalization run on jaxnorm.

    The same constructor, buffers (``image_min``, ``image_max``, ``pixel_min``, ``pixel_max``,
    ``_image_threshold``, ``_pixel_threshold``), state-dict keys and ``checkpoint_config`` as
    anomalib's, so checkpoints load both ways. What changes:

    - **Validation:** each batch's ``pred_score`` (image) and ``anomaly_map`` (pixel) min/max,
      and the F1 adaptive thresholds' states of ``pred_score``/``gt_label`` and
      ``anomaly_map``/``gt_mask``, are folded by jaxnorm in one dispatch, with no host read;
      at validation epoch end they are written into the buffers (reduced across ranks under
      DDP) and reset, as anomalib does with its ``MinMax`` and ``F1AdaptiveThreshold``
      metrics. The thresholds are anomalib's bit for bit (``jaxnorm.f1_adaptive_threshold``),
      without sorting every pixel; anomalib's metrics stay attributes, never updated.
    - **Non-finite validation scores:** where anomalib would store NaN statistics (and pass
      every test score through unnormalized), ``nonfinite="raise"`` (default) raises
      ``jaxnorm.NonFiniteScoresError`` naming the field and count at validation epoch end,
      after storing the statistics of the clean batches; ``nonfinite="omit"`` skips the
      non-finite values.
    - **Test and predict:** normalization and labels run through jaxnorm with anomalib 2's
      rules, in one dispatch per batch; float32, float16 and bfloat16 results equal
      anomalib's bit for bit.
    - **forward** (``InferenceBatch``): eagerly through jaxnorm; under ``torch.export``,
      ``torch.compile``, ONNX export, ``torch.jit`` or FX tracing, anomalib's torch formula,
      so exported models hold plain torch ops.
    - **Pickling** (``torch.save(model)``, ``Engine.export(..., ExportType.TORCH)``) stores
      anomalib's own ``PostProcessor`` class with the same buffers and settings: the exported
      model loads and runs where neither jax nor torch_compat is installed. ``copy.deepcopy``
      and multiprocessing (``ddp_spawn``) keep this class.

    Args:
      enable_normalization: as anomalib's.
      enable_thresholding: as anomalib's.
      enable_threshold_matching: as anomalib's.
      image_sensitivity: as anomalib's.
      pixel_sensitivity: as anomalib's.
      nonfinite: ``"raise"`` (default) or ``"omit"``, see above.
      **kwargs: as anomalib's.
    """

    def __init__(
        self,
        enable_normalization: bool = True,
        enable_thresholding: bool = True,
        enable_threshold_matching: bool = True,
        image_sensitivity: float = 0.5,
        pixel_sensitivity: float = 0.5,
        *,
        nonfinite: str = "raise",
        **kwargs: Any,
    ) -> None:
        state = JaxState(nonfinite)  # checks the option before anomalib's constructor runs
        super().__init__(
            enable_normalization=enable_normalization,
            enable_thresholding=enable_thresholding,
            enable_threshold_matching=enable_threshold_matching,
            image_sensitivity=image_sensitivity,
            pixel_sensitivity=pixel_sensitivity,
            **kwargs,
        )
        # A plain attribute, not a submodule: the state dict stays anomalib's.
        self.__dict__[_STATE] = state

    @property
    def nonfinite(self) -> str:
        return self.__dict__[_STATE].nonfinite

    # -- validation ------------------------------------------------------------------------

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, *args: Any, **kwargs: Any
    ) -> None:
        """Folds the min/max and the F1 thresholds' states through jaxnorm: one dispatch."""
        del trainer, pl_module, args, kwargs
        self.__dict__[_STATE].fold(
            outputs,
            statistics=bool(self.enable_normalization),
            thresholds=bool(self.enable_thresholding),
        )

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Stores jaxnorm's F1 thresholds and statistics in anomalib's buffers.

        Raises:
          jaxnorm.NonFiniteScoresError: validation scores held NaN/inf under
            ``nonfinite="raise"`` (under DDP, on every rank).
          ValueError: ``gt_label``/``gt_mask`` held values other than 0 and 1.
        """
        del trainer, pl_module
        self.__dict__[_STATE].end_epoch(
            self,
            statistics=bool(self.enable_normalization),
            thresholds=bool(self.enable_thresholding),
        )

    # -- test and predict ------------------------------------------------------------------

    def post_process_batch(self, batch: Any) -> None:
        """Normalizes and labels the batch in place: one jaxnorm dispatch."""
        if not (self.enable_normalization and self._process_in_place(batch)):
            super().post_process_batch(batch)

    def normalize_batch(self, batch: Any) -> None:
        """Normalizes ``anomaly_map`` and ``pred_score`` in place through jaxnorm."""
        self._process_in_place(batch, labels=False)

    def _process_in_place(self, batch: Any, labels: bool | None = None) -> bool:
        """Rewrites ``batch``'s scores and maps (and, with ``labels``, the labels it lacks)
        with jaxnorm's results; ``False`` when it holds neither field (nothing done)."""
        values = {k: v for k in (SCORE, MAP) if (v := getattr(batch, k, None)) is not None}
        if not values:
            return False
        labels = self.enable_thresholding if labels is None else labels
        out = self.__dict__[_STATE].process(self, values, labels=labels)
        for key in (MAP, SCORE):
            if key in out:
                setattr(batch, key, out[key])
        for label in ("pred_label", "pred_mask") if labels else ():
            if getattr(batch, label, None) is None and label in out:
                setattr(batch, label, out[label])
        return True

    def forward(self, predictions: InferenceBatch) -> InferenceBatch:
        """anomalib's ``forward``: through jaxnorm eagerly, anomalib's torch ops when traced."""
        score, amap = predictions.pred_score, predictions.anomaly_map
        if (
            exporting()
            or not self.enable_normalization
            or (score is None and amap is None)
            or not plain((score, amap))
        ):
            return super().forward(predictions)
        if score is None:
            score = torch.amax(amap, dim=(-2, -1))
        values = {SCORE: score} if amap is None else {SCORE: score, MAP: amap}
        out = self.__dict__[_STATE].process(self, values, labels=self.enable_thresholding)
        return InferenceBatch(
            pred_label=out.get("pred_label"),
            pred_score=out[SCORE],
            pred_mask=out.get("pred_mask"),
            anomaly_map=out.get(MAP),
        )

    # -- copies and pickles ----------------------------------------------------------------

    def __reduce_ex__(self, protocol: int):
        """Pickles as anomalib's ``PostProcessor``: exported models need no jax to load."""
        return _as_anomalib(self)

    def __copy__(self) -> PostProcessor:
        cls = type(self)
        new = cls.__new__(cls)
        new.__dict__.update(self.__dict__)
        # The same hook (a shallow copy), none of the original's caches (see _change).
        new.__dict__[_STATE] = copy.copy(self.__dict__[_STATE])
        return new

    def __deepcopy__(self, memo: dict) -> PostProcessor:
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def extra_repr(self) -> str:
        return f"nonfinite={self.nonfinite!r}, jaxnorm"


def _as_anomalib(obj: PostProcessor):
    state = {k: v for k, v in obj.__dict__.items() if k != _STATE}
    # copyreg's protocol-0 reconstructor: object.__new__(cls), then nn.Module.__setstate__.
    return (copyreg._reconstructor, (AnomalibPostProcessor, object, None), state)


def _rebuild(cls: type, state: dict, nonfinite: str) -> PostProcessor:
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    obj.__dict__[_STATE] = JaxState(nonfinite)
    return obj


def _reduce_keep_class(obj: PostProcessor):
    # Multiprocessing (Lightning's ddp_spawn) pickles the model for its workers: they run
    # this class, with fresh jaxnorm state.
    state = {k: v for k, v in obj.__dict__.items() if k != _STATE}
    return (_rebuild, (type(obj), state, obj.nonfinite))


ForkingPickler.register(PostProcessor, _reduce_keep_class)
