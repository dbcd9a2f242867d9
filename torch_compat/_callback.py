"""The Lightning hooks of anomalib's callback, wired to one ``jaxnorm.MinMaxNormalizationHook``.

This module imports no Lightning namespace: ``torch_compat.pytorch_lightning`` and
``torch_compat.lightning`` mix ``MinMaxNormalizationHooks`` into each namespace's ``Callback``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import torch

from jaxnorm import MinMax as JaxMinMax
from jaxnorm import MinMaxNormalizationHook, NormalizationStats
from jaxnorm._src.hook import NonFinitePolicy
from jaxnorm._src.outputs import NORMALIZED_KEYS, StatsMode
from torch_compat._allreduce import allreduce_stats, ddp_active
from torch_compat._dlpack import host_to_torch, to_jax, to_torch
from torch_compat._minmax import MinMax

_ATTRIBUTE_HINT = (
    "MinMaxNormalizationCallback reads anomalib's AnomalyModule attributes: give the module "
    "`image_threshold` and `pixel_threshold` objects whose `.value` is a 0-d tensor (raw-score "
    "units)."
)


def _check_tensor(key: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"outputs['{key}']: expected a torch.Tensor, got {type(value).__name__}; "
            "return tensors from the step (anomalib's outputs protocol)."
        )
    return value


class _JaxView(Mapping):
    """The normalized keys of a step's outputs, converted to jax on first access."""

    __slots__ = ("_outputs", "_keys", "_cache")

    def __init__(self, outputs: Any) -> None:
        if not isinstance(outputs, Mapping):
            raise ValueError(
                f"outputs: expected the dict a step returns, got {type(outputs).__name__}; "
                "return a dict with 'anomaly_maps', 'box_scores' or 'pred_scores'."
            )
        self._outputs = outputs
        self._keys = [key for key in NORMALIZED_KEYS if key in outputs]
        self._cache: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            if key not in self._keys:
                raise KeyError(key)
            value = self._outputs[key]
            if key == "box_scores" and isinstance(value, (list, tuple)):
                self._cache[key] = [
                    to_jax(_check_tensor(f"{key}[{i}]", b)) for i, b in enumerate(value)
                ]
            else:
                # Anything else goes to the hook, which names what is wrong with it.
                self._cache[key] = to_jax(_check_tensor(key, value))
        return self._cache[key]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _Watched:
    """Remembers which tensor (and which in-place version of it) a host value came from."""

    __slots__ = ("source", "version")

    def __init__(self) -> None:
        self.source: Any = None
        self.version: Any = None

    def unchanged(self, source: Any, version: Any) -> bool:
        return version is not None and source is self.source and version == self.version

    def remember(self, source: Any, version: Any) -> None:
        self.source, self.version = source, version


def _tensor_version(value: Any) -> int | None:
    if isinstance(value, torch.Tensor) and not value.is_inference():
        return value._version
    return None


class MinMaxNormalizationHooks:
    """Min-max normalization of anomaly scores: anomalib's callback, computed by jaxnorm.

    A drop-in for ``anomalib.utils.callbacks.MinMaxNormalizationCallback`` (anomalib 0.3.6 to
    0.7): the same hooks and signatures, the same ``pl_module`` attributes
    (``image_threshold.value``, ``pixel_threshold.value``, ``image_metrics``,
    ``pixel_metrics``, ``normalization_metrics``) and the same output keys
    (``anomaly_maps``, ``box_scores``, ``pred_scores``). Validation outputs feed the
    statistics; test and predict outputs are normalized in place, so ``trainer.predict``
    returns scores in [0, 1] with each threshold at 0.5.

    Tensors go to jax through DLPack (zero-copy on CPU, and on CUDA when jax has a GPU) and
    all the work is done by one ``jaxnorm.MinMaxNormalizationHook``, ``self.hook``; results
    come back as tensors with the input's dtype, shape and device.

    The statistics live in ``pl_module.normalization_metrics`` (a ``torch_compat.MinMax``):
    written at each validation epoch end and read back before test and predict, so they
    travel in checkpoints under anomalib's keys and ``trainer.test(model, ckpt_path=...)``
    normalizes with them. Under DDP (any torch.distributed process group) every rank ends
    each validation epoch with the global statistics.

    The hooks use nothing of ``trainer``: they can be driven by hand with ``trainer=None``.
    This class holds the hooks; ``torch_compat.MinMaxNormalizationCallback`` and
    ``torch_compat.lightning.MinMaxNormalizationCallback`` mix it into each Lightning
    namespace's ``Callback``.

    Args:
      stats: ``"shared"`` (default, anomalib 0.x: one min/max from maps, else boxes, else
        scores) or ``"separate"`` (image statistics from ``pred_scores``, pixel statistics
        from maps or boxes, as anomalib >= 1.1.1).
      accumulate: keep the statistics across validation epochs, sanity check included, as
        anomalib 0.x did. The default resets them at each validation epoch start.
      nonfinite: ``"raise"`` (default): NaN or inf in validation outputs raise
        ``jaxnorm.NonFiniteScoresError`` naming the key and count (under DDP, at epoch end
        on every rank). ``"omit"``: they are skipped.
    """

    def __init__(
        self,
        *,
        stats: StatsMode = "shared",
        accumulate: bool = False,
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__()
        # The thresholds are read from pl_module before each batch; the reducer is chosen at
        # each validation epoch start (torch.distributed, not JAX processes).
        self.hook = MinMaxNormalizationHook(
            stats=stats, accumulate=accumulate, nonfinite=nonfinite, reducer=None
        )
        self._stats_source = _Watched()
        self._thresholds = {"image_threshold": _Watched(), "pixel_threshold": _Watched()}

    # -- the statistics' home: pl_module.normalization_metrics -----------------------------

    def _metrics(self, pl_module: Any) -> MinMax:
        if not hasattr(pl_module, "normalization_metrics"):
            pl_module.normalization_metrics = MinMax(self.hook.stats_mode)
        elif not isinstance(pl_module.normalization_metrics, MinMax):
            raise AttributeError(
                "Expected normalization_metrics to be of type MinMax, got "
                f"{type(pl_module.normalization_metrics)}"
            )
        return pl_module.normalization_metrics

    def _load_stats(self, pl_module: Any) -> None:
        """Reads the buffers into the hook when they changed (restored, written, replaced)."""
        metrics = self._metrics(pl_module)
        version = metrics.version()
        if self._stats_source.unchanged(metrics, version):
            return
        stats = metrics.read()
        self.hook.set_stats(_stats_from_host(stats))
        self._stats_source.remember(metrics, version)

    def _load_thresholds(self, pl_module: Any) -> None:
        for name, watched in self._thresholds.items():
            try:
                value = getattr(pl_module, name).value
            except AttributeError:
                raise AttributeError(
                    f"pl_module.{name}.value is missing; {_ATTRIBUTE_HINT}"
                ) from None
            version = _tensor_version(value)
            if watched.unchanged(value, version):
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(
                        f"pl_module.{name}.value: expected one number, got shape "
                        f"{tuple(value.shape)}."
                    )
                number = value.item()
            else:
                number = value
            setattr(self.hook, name, number)
            watched.remember(value, version)

    # -- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        """Attaches ``normalization_metrics`` (keeping a compatible one, e.g. restored)."""
        del trainer, stage
        self._metrics(pl_module).configure(self.hook.stats_mode)
        self._stats_source.remember(None, None)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Resets the statistics, unless ``accumulate=True``.

        Accumulation goes on from the statistics in ``normalization_metrics`` (e.g. restored
        when resuming from a checkpoint), as anomalib's metric state did.
        """
        del trainer
        self.hook.reducer = allreduce_stats if ddp_active() else None
        if self.hook.accumulate:
            self._load_stats(pl_module)
        self.hook.on_validation_epoch_start()

    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Folds the batch's maps, else box scores, else image scores into the statistics."""
        del trainer, pl_module, batch, batch_idx, dataloader_idx
        self.hook.on_validation_batch_end(_JaxView(outputs))

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """All-reduces the statistics under DDP and stores them in ``normalization_metrics``."""
        del trainer
        self.hook.on_validation_epoch_end()
        metrics = self._metrics(pl_module)
        metrics.write(self.hook.host_stats())
        self._stats_source.remember(metrics, metrics.version())

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """Sets the metrics' thresholds to 0.5 and loads the statistics (e.g. restored)."""
        del trainer
        for metrics in (
            getattr(pl_module, "image_metrics", None),
            getattr(pl_module, "pixel_metrics", None),
        ):
            if metrics is not None:
                metrics.set_threshold(0.5)
        self._load_stats(pl_module)
        self.hook.on_test_start()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """Loads the statistics (e.g. restored from a checkpoint)."""
        del trainer
        self._load_stats(pl_module)

    def on_test_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Normalizes the outputs dict in place."""
        del trainer, batch, batch_idx, dataloader_idx
        self._normalize_batch(outputs, pl_module)

    def on_predict_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Normalizes the outputs dict in place, so ``trainer.predict`` returns it normalized."""
        del trainer, batch, batch_idx, dataloader_idx
        self._normalize_batch(outputs, pl_module)

    def _normalize_batch(self, outputs: Any, pl_module: Any) -> None:
        self._load_stats(pl_module)
        self._load_thresholds(pl_module)
        view = _JaxView(outputs)
        normalized = self.hook.normalize_batch(view, boxes_on_host=True)
        for key in view:
            like = outputs[key]
            if key == "box_scores" and isinstance(like, (list, tuple)):
                outputs[key] = [
                    host_to_torch(n, b) for n, b in zip(normalized[key], like, strict=True)
                ]
            else:
                outputs[key] = to_torch(normalized[key], like)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(stats={self.hook.stats_mode!r}, "
            f"accumulate={self.hook.accumulate}, nonfinite={self.hook.nonfinite!r})"
        )


def _stats_from_host(stats: Mapping[str, tuple[float, float]]) -> NormalizationStats:
    return NormalizationStats(
        **{
            which: JaxMinMax(min=jnp.float32(lo), max=jnp.float32(hi))
            for which, (lo, hi) in stats.items()
        }
    )
