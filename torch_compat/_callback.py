"""The Lightning hooks of anomalib's callback, wired to one ``jaxnorm.MinMaxNormalizationHook``.

This module imports no Lightning namespace: ``torch_compat.pytorch_lightning`` and
``torch_compat.lightning`` mix ``MinMaxNormalizationHooks`` into each namespace's ``Callback``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch

from jaxnorm import MinMax as JaxMinMax
from jaxnorm import MinMaxNormalizationHook, NonFiniteScoresError, NormalizationStats
from jaxnorm._src import batching, hook_step
from jaxnorm._src.hook import NonFinitePolicy
from jaxnorm._src.outputs import NORMALIZED_KEYS, PIXEL, StatsMode, stats_sources
from jaxnorm._src.validation import loaded_stats
from torch_compat import _dlpack
from torch_compat._allreduce import allreduce_stats, broadcast_from_rank0, ddp_active
from torch_compat._dlpack import host_to_torch, to_jax, to_torch
from torch_compat._minmax import ATTRIBUTE, MinMax, stat_tensors, write_in_place, write_stats

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

    __slots__ = ("_outputs", "_keys", "_cache", "devices")

    def __init__(self, outputs: Any) -> None:
        if not isinstance(outputs, Mapping):
            raise ValueError(
                f"outputs: expected the dict a step returns, got {type(outputs).__name__}; "
                "return a dict with 'anomaly_maps', 'box_scores' or 'pred_scores'."
            )
        self._outputs = outputs
        self._keys = [key for key in NORMALIZED_KEYS if key in outputs]
        self._cache: dict[str, Any] = {}
        self.devices: set[torch.device] = set()  # of the tensors converted so far

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            if key not in self._keys:
                raise KeyError(key)
            value = self._outputs[key]
            if key == "box_scores" and isinstance(value, (list, tuple)):
                tensors = [_check_tensor(f"{key}[{i}]", b) for i, b in enumerate(value)]
                # Flat, as anomalib's torch.cat takes (k, 1) or (k,) entries alike; each
                # comes back in its own shape.
                self._cache[key] = [
                    to_jax(b.reshape(-1), name=f"outputs['{key}'][{i}]")
                    for i, b in enumerate(tensors)
                ]
                self.devices.update(b.device for b in tensors)
            elif key == "box_scores" and isinstance(value, torch.Tensor):
                raise ValueError(
                    f"outputs['box_scores']: expected a list with one tensor of box scores "
                    f"per image (anomalib's outputs protocol), got one tensor of shape "
                    f"{tuple(value.shape)}; wrap the per-image tensors in a list."
                )
            else:
                # Anything else goes to the hook, which names what is wrong with it.
                t = _check_tensor(key, value)
                self._cache[key] = to_jax(t, name=f"outputs['{key}']")
                self.devices.add(t.device)
        return self._cache[key]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


# The keys whose leading axis is the batch axis (box_scores are bucketed by the hook itself).
_ROW_KEYS = ("pred_scores", "anomaly_maps")
_ROWS = "rows"  # the shim's one bucket key: both keys share their batch size


def _pad_rows(outputs: Any, buckets: batching.Buckets, phase: str) -> tuple[Any, int | None]:
    """Pads the batch axis in torch when a batch has a new, odd size, so jax compiles per
    bucket and not per size; slicing back is a torch view. Returns ``(outputs, n)``, with
    ``outputs`` a padded shallow copy and ``n`` the true size, or ``(outputs, None)``.

    torch pads and slices without compiling anything, on every device; the hook's own
    padding would compile a pad per size for CUDA arrays, and on the CPU wait for the slice.
    """
    if not isinstance(outputs, Mapping):
        return outputs, None  # _JaxView names the problem
    present = [outputs[key] for key in _ROW_KEYS if key in outputs]
    if not present or not all(isinstance(t, torch.Tensor) and t.ndim > 0 for t in present):
        return outputs, None
    sizes = {t.shape[0] for t in present}
    if len(sizes) != 1 or any(t.device.type == "meta" for t in present):
        return outputs, None  # the hook buckets each key itself, or names the problem
    n = sizes.pop()
    rows = buckets.rows(phase, _ROWS, n)
    if rows == n:
        return outputs, None
    padded = dict(outputs)
    for key in _ROW_KEYS:
        if key in outputs:
            t = outputs[key].detach()
            padded[key] = torch.cat([t, t.new_zeros((rows - n, *t.shape[1:]))])
    return padded, n


def hand_back(hook: MinMaxNormalizationHook, devices: Iterable[torch.device]) -> None:
    """Hands a validation batch's tensors on ``devices`` back to torch once ``hook``'s last
    fold has read them.

    The fold reads them zero-copy and asynchronously; a caller may write an output tensor in
    place once the hook has returned (a reused buffer, the same tensor sent again), as
    anomalib's synchronous update allowed. On CUDA torch's stream waits for the fold (no
    host wait); on the CPU the host does.
    """
    for device in devices:
        _dlpack.wait_for(hook._state.counters, device)


class _Watched:
    """Remembers which tensors (and which contents of them: ``_contents``, or in-place
    versions: ``_version``) host values came from.

    Reading a CUDA tensor's value on the host waits for the GPU; comparing identities,
    storages and version counters does not, so unchanged thresholds and statistics on an
    accelerator are never read again.
    """

    __slots__ = ("tensors", "versions")

    def __init__(self) -> None:
        self.tensors: tuple = ()
        self.versions: tuple | None = None

    def unchanged(self, tensors: tuple, versions: tuple | None) -> bool:
        return (
            versions is not None
            and versions == self.versions
            and len(tensors) == len(self.tensors)
            and all(a is b for a, b in zip(tensors, self.tensors, strict=True))
        )

    def remember(self, tensors: tuple, versions: tuple | None) -> None:
        self.tensors, self.versions = tensors, versions

    def forget(self) -> None:
        self.remember((), None)


# Whether reading a tensor waits for no device (a test stands in accelerators here).
_on_host = operator.attrgetter("is_cpu")


def _version(value: Any) -> Any:
    """What tells an in-place write of ``value`` apart, without reading it; ``None``:
    unknown, read it again. (anomalib 2's PostProcessor keys its buffers by this; the
    callback by ``_contents``.)"""
    if not isinstance(value, torch.Tensor):
        return None
    if value.is_inference():
        # Inference tensors keep no version counter. On the CPU a read costs nothing; on an
        # accelerator it would wait for the device at every batch, so there the tensor's
        # identity decides (anomalib replaces its thresholds and states, not writes them).
        return None if value.device.type == "cpu" else "inference"
    return value._version


def _versions(tensors: tuple) -> tuple | None:
    versions = tuple(_version(t) for t in tensors)
    return None if None in versions else versions


def _contents(value: Any) -> Any:
    """What tells a change of ``value``'s contents apart without waiting for a device;
    ``None``: unknown, read it again.

    On the CPU (and for Python or numpy numbers) the value itself, read (~0.2 us): it sees
    every write, also those that leave the version counter as it was (through ``.data``, a
    numpy alias, inference mode) or swap the storage (``t.data = ...``). On an accelerator
    a read would wait for the device at every batch, so the storage and the in-place
    version counter decide, and for inference tensors (no counter) the storage alone
    (anomalib replaces its thresholds and states rather than writing them).
    """
    if isinstance(value, torch.Tensor):
        if not _on_host(value):
            if value.is_inference():
                return ("inference", value.data_ptr())
            return (value._version, value.data_ptr())
        try:
            number = value.item()
        except RuntimeError:  # not one number: the caller reads it and names the problem
            return None
    elif isinstance(value, (np.ndarray, np.generic)):
        if value.size != 1:
            return None
        number = value.item()
    elif isinstance(value, (int, float)):
        number = value
    else:
        return None
    return number if number == number else "nan"  # NaN keys compare equal


def _contents_of(tensors: tuple) -> tuple | None:
    keys = tuple(_contents(t) for t in tensors)
    return None if None in keys else keys


def _check_not_meta(source: str, key: str, value: Any) -> None:
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        raise ValueError(
            f"{source}: '{key}' is a tensor on the 'meta' device, which has no value; load the "
            "weights into the module (e.g. `module.to_empty(device='cpu')` then "
            "`load_state_dict`) before testing or predicting."
        )


# Dtypes a test batch may take the steady path with: jax keeps them as they are, and the
# normalized result has the same dtype, so nothing is cast on either side.
_PLAN_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
_NUMPY_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _exchangeable(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``import_batch`` takes it: detached, and copied when jax could not read its
    memory in place (a storage offset), as ``to_jax`` does."""
    t = t.detach() if t.requires_grad else t
    return t.clone() if _dlpack.misaligned(t) else t


def batch_device(tensors: list[Any]) -> torch.device | None:
    """The one device of ``tensors`` when ``_dlpack.import_batch`` can take them (after
    ``_exchangeable``); ``None`` where ``to_jax`` must take them one by one (another type or
    dtype, 0-d, devices that differ, not contiguous, pinned memory, or no direct DLPack calls
    on this jaxlib)."""
    if not tensors or type(tensors[0]) is not torch.Tensor:
        return None
    device = tensors[0].device
    for t in tensors:
        if (
            type(t) is not torch.Tensor
            or t.dtype not in _PLAN_DTYPES
            or t.ndim == 0
            or t.device != device
            or not t.is_contiguous()
        ):
            return None
    if not _dlpack.batch_device_ok(device):
        return None
    # DLPack labels pinned memory as CUDA host memory: those take to_jax's copy.
    if device.type == "cpu" and _dlpack._cuda_available() and any(t.is_pinned() for t in tensors):
        return None
    return device


class _Plan:
    """What every batch of one layout needs, settled by the first batch of that layout.

    A loop hands over batches of the same keys, dtypes, shapes and device (and, in test and
    predict, the same thresholds and statistics). The first such batch runs every check of
    the full path, then leaves this plan behind. A later batch that matches it (type, dtype,
    shape, device and layout compared on the host; thresholds and statistics by identity and
    ``_contents``) skips what the first one established:

    - test/predict: one import per key with one stream ordering, one jitted call for every
      key, and one zero-copy export per key;
    - validation: one import per key feeding the statistics, with one stream ordering, and
      the hook's one jitted fold.

    Anything else takes the full path, whose errors name what is wrong. Only float tensors
    without ``box_scores``, needing no padding, on a device with the direct DLPack calls
    (see ``_dlpack.batch_device_ok``) get a plan.

    Attributes:
      keys: the keys whose tensors cross to jax, in order.
      present: every known output key the batch holds (validation: the shared statistics
        read one of several, so the others' presence is part of the layout).
      fn, params, sources: test/predict only: the jitted call, the packed thresholds and
        statistics, and their torch sources (see ``MinMaxNormalizationHooks._sources``).
      routes: validation only: ``outputs.stats_sources`` of the layout.
    """

    __slots__ = (
        "keys",
        "layout",
        "also",
        "others",
        "device",
        "cpu",
        "pinned",
        "fn",
        "params",
        "sources",
        "routes",
    )

    def __init__(
        self,
        keys,
        tensors,
        device,
        *,
        present=None,
        fn=None,
        params=None,
        sources=None,
        routes=None,
    ) -> None:
        present = keys if present is None else present
        self.keys = keys
        self.layout = tuple((k, t.dtype, t.shape) for k, t in zip(keys, tensors, strict=True))
        self.also = tuple(k for k in present if k not in keys)
        self.others = tuple(k for k in NORMALIZED_KEYS if k not in present)
        self.device = device
        self.cpu = device.type == "cpu"
        # DLPack labels pinned memory as CUDA host memory: those take to_jax's copy.
        self.pinned = self.cpu and _dlpack._cuda_available()
        self.fn = fn
        self.params = params
        self.sources = sources
        self.routes = routes

    def tensors(self, outputs: Any) -> list[torch.Tensor] | None:
        """The batch's tensors when ``outputs`` matches the plan's layout, else ``None``."""
        if type(outputs) is not dict:
            return None
        tensors = []
        for key, dtype, shape in self.layout:
            t = outputs.get(key)
            if (
                type(t) is not torch.Tensor
                or t.dtype is not dtype
                or t.shape != shape
                or t.device != self.device
                or not t.is_contiguous()
            ):
                return None
            if self.pinned and t.is_pinned():
                return None
            tensors.append(_exchangeable(t))
        for key in self.also:
            if key not in outputs:
                return None
        for key in self.others:
            if key in outputs:
                return None
        return tensors


def plan_tensors(
    hook: MinMaxNormalizationHook, outputs: Any, keys: tuple[str, ...], phase: str
) -> tuple[list[torch.Tensor], torch.device] | None:
    """The tensors of ``keys`` and their device when batches laid out as ``outputs`` can take
    a plan in ``phase``, else ``None``."""
    if not keys or "box_scores" in keys:
        return None
    tensors = [outputs[key] for key in keys]
    device = batch_device(tensors)
    if device is None:
        return None
    # A batch of these shapes runs at its exact size (no padding by the shim or the hook).
    buckets = hook._buckets
    if any(
        buckets.rows(phase, k, t.shape[0]) != t.shape[0] for k, t in zip(keys, tensors, strict=True)
    ):
        return None
    return tensors, device


def validation_plan(hook: MinMaxNormalizationHook, outputs: Any) -> _Plan | None:
    """A plan for validation batches laid out as ``outputs`` (just folded by the full path,
    unpadded), or ``None`` where the full path stays."""
    if type(outputs) is not dict:
        return None
    routes = tuple(stats_sources(outputs, hook.stats_mode))
    keys = tuple(key for _, key in routes)
    found = plan_tensors(hook, outputs, keys, batching.VALIDATION)
    if found is None:
        return None
    present = tuple(key for key in NORMALIZED_KEYS if key in outputs)
    return _Plan(keys, found[0], found[1], present=present, routes=routes)


def fold_validation_batch(
    hook: MinMaxNormalizationHook, outputs: Any, plan: _Plan | None
) -> _Plan | None:
    """Folds one validation batch's outputs into ``hook``; returns the plan for the next.

    A batch that matches ``plan`` takes the steady path: one import per key feeding the
    statistics (one stream ordering) and the hook's one jitted fold. Any other batch takes
    the full path (padding, every check, the errors that name what is wrong) and, when it
    needed no padding, leaves a plan for its layout. Either way the tensors are handed back
    to torch once the fold has read them (``hand_back``).
    """
    if plan is not None:
        tensors = plan.tensors(outputs)
        if tensors is not None:
            arrays = _dlpack.import_batch(tensors, plan.device)
            hook._fold(dict(zip(plan.keys, arrays, strict=True)), {}, plan.routes)
            hand_back(hook, (plan.device,))
            return plan
    padded, n = _pad_rows(outputs, hook._buckets, batching.VALIDATION)
    view = _JaxView(padded)
    hook.on_validation_batch_end(view, valid_rows=n)
    hand_back(hook, view.devices)
    return validation_plan(hook, outputs) if n is None else None


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

    The statistics live in ``pl_module.normalization_metrics`` (a ``torch_compat.MinMax``,
    attached when missing; any object whose ``min`` and ``max`` are tensors is kept, such as
    the ``anomalib.utils.metrics.MinMax`` that anomalib's ``load_state_dict`` puts there):
    written in place at each validation epoch end and read back before test and predict, so
    they travel in checkpoints under anomalib's keys and ``trainer.test(model, ckpt_path=...)``
    normalizes with them. Statistics read back are checked first (finite or empty, one
    number each, ``max >= min``); unchanged tensors are not read again. Under DDP (any
    torch.distributed process group) every rank ends each validation epoch with the global
    statistics.

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
        self._plan: _Plan | None = None  # test and predict
        self._validation_plan: _Plan | None = None

    # -- the statistics' home: pl_module.normalization_metrics -----------------------------

    def _metrics(self, pl_module: Any) -> Any:
        """``pl_module.normalization_metrics``: attached if missing, checked otherwise.

        Any object whose ``min`` and ``max`` are one-element tensors will do: ours, or the
        ``anomalib.utils.metrics.MinMax`` that anomalib's ``load_state_dict`` puts there.
        """
        metrics = getattr(pl_module, ATTRIBUTE, None)
        if metrics is None:
            metrics = MinMax(self.hook.stats_mode)
            setattr(pl_module, ATTRIBUTE, metrics)
        stat_tensors(metrics, self.hook.stats_mode)  # raises, naming what is there
        return metrics

    def _home(self, pl_module: Any) -> Any:
        """Where the statistics' tensors are read from: ``pl_module.normalization_metrics``
        (``None`` when missing), or what a subclass puts in front of it (the anomalib 1.x
        adapter: a view of its per-output ``MetricCollection``). Looked up at every use:
        anomalib replaces the attribute when it loads a state dict."""
        return getattr(pl_module, ATTRIBUTE, None)

    def _sources(self, pl_module: Any) -> tuple | None:
        """The thresholds' and statistics' objects and their contents' keys (``_contents``),
        for a plan to compare (objects by identity, keys by equality); ``None`` when a key
        is unknown (e.g. a tensor that is not one number): such sources are read at every
        batch."""
        metrics = self._home(pl_module)
        objects = [metrics, getattr(metrics, "min", None), getattr(metrics, "max", None)]
        if self.hook.stats_mode == "separate":
            objects += [getattr(metrics, "pixel_min", None), getattr(metrics, "pixel_max", None)]
        for name in self._thresholds:
            objects.append(getattr(getattr(pl_module, name, None), "value", None))
        versions = []
        for value in objects[1:]:
            version = None if value is None else _contents(value)
            if version is None and value is not None:
                return None
            versions.append(version)
        return tuple(objects), tuple(versions)

    def _sources_unchanged(self, pl_module: Any, sources: tuple) -> bool:
        now = self._sources(pl_module)
        if now is None:
            return False
        (objects, versions), (was_objects, was_versions) = now, sources
        return versions == was_versions and all(
            a is b for a, b in zip(objects, was_objects, strict=True)
        )

    def _load_stats(self, pl_module: Any) -> None:
        """Reads the statistics into the hook when they changed (restored, written, replaced).

        Raises:
          ValueError: naming the source, key and value, for statistics that are not finite
            (other than the empty pair), not one number each, or with ``max < min``.
        """
        metrics = self._home(pl_module)
        if metrics is None:
            metrics = self._metrics(pl_module)
        pairs = stat_tensors(metrics, self.hook.stats_mode)  # raises, naming what is there
        tensors = tuple(t for pair in pairs.values() for _, t in pair)
        versions = _contents_of(tensors)
        if self._stats_source.unchanged(tensors, versions):
            return
        source = "checkpoint" if getattr(metrics, "loaded_from_checkpoint", False) else ATTRIBUTE
        stats, read = {}, {}
        for which, pair in pairs.items():
            if id(pair) not in read:  # shared statistics: one pair, read once
                (lo_key, lo), (hi_key, hi) = pair
                _check_not_meta(source, lo_key, lo)
                _check_not_meta(source, hi_key, hi)
                read[id(pair)] = loaded_stats(source, lo_key, lo, hi_key, hi)
            stats[which] = read[id(pair)]
        self.hook.set_stats(_stats_from_host(stats))
        self._stats_source.remember(tensors, versions)

    def _share_rank0_stats(self, pl_module: Any) -> None:
        """Under DDP, every rank takes rank 0's statistics before they are used.

        After restoring a checkpoint, Lightning 1.x resets every torchmetrics ``Metric`` on the
        ranks other than 0 (their states are taken to be accumulated on rank 0), ours and
        anomalib's included; rank 0's are the checkpoint's. Every rank calls this at the same
        hooks (a collective); the values are checked afterwards, on every rank alike.
        """
        if not ddp_active():
            return
        pairs = stat_tensors(self._metrics(pl_module), self.hook.stats_mode)
        tensors = list({id(t): t for pair in pairs.values() for _, t in pair}.values())
        usable = [t.numel() == 1 and t.device.type != "meta" for t in tensors]
        local = [
            float(t.reshape(())) if ok else math.nan for t, ok in zip(tensors, usable, strict=True)
        ]
        for t, ok, value in zip(tensors, usable, broadcast_from_rank0(local), strict=True):
            if ok:
                write_in_place(t, value)

    def _load_thresholds(self, pl_module: Any) -> None:
        for name, watched in self._thresholds.items():
            try:
                value = getattr(pl_module, name).value
            except AttributeError:
                raise AttributeError(
                    f"pl_module.{name}.value is missing; {_ATTRIBUTE_HINT}"
                ) from None
            versions = _contents_of((value,))
            if watched.unchanged((value,), versions):
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(
                        f"pl_module.{name}.value: expected one number, got shape "
                        f"{tuple(value.shape)}."
                    )
                _check_not_meta(f"pl_module.{name}", "value", value)
                number = value.item()
            else:
                number = value
            try:
                setattr(self.hook, name, number)
            except ValueError as error:
                raise ValueError(f"pl_module.{name}.value: {error}") from None
            watched.remember((value,), versions)

    # -- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        """Attaches ``normalization_metrics`` (keeping a compatible one, e.g. restored)."""
        del trainer, stage
        metrics = self._metrics(pl_module)
        if isinstance(metrics, MinMax):
            metrics.configure(self.hook.stats_mode)
        self._stats_source.forget()
        self._plan = self._validation_plan = None

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Resets the statistics, unless ``accumulate=True``.

        Accumulation goes on from the statistics in ``normalization_metrics`` (e.g. restored
        when resuming from a checkpoint), as anomalib's metric state did.
        """
        del trainer
        self.hook.reducer = allreduce_stats if ddp_active() else None
        metrics = self._metrics(pl_module)
        pairs = stat_tensors(metrics, self.hook.stats_mode)
        if self.hook.stats_mode == "separate" and pairs[PIXEL] is pairs["image"]:
            raise ValueError(
                f"pl_module.{ATTRIBUTE} is a {type(metrics).__qualname__}, which holds one "
                "min/max pair, but the callback collects separate image and pixel statistics "
                f"(stats='separate'); set `pl_module.{ATTRIBUTE} = "
                "torch_compat.MinMax(stats='separate')` before validating, or use "
                "stats='shared'."
            )
        if self.hook.accumulate:
            self._share_rank0_stats(pl_module)
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
        plan, self._validation_plan = self._validation_plan, None
        self._validation_plan = fold_validation_batch(self.hook, outputs, plan)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """All-reduces the statistics under DDP and stores them in ``normalization_metrics``.

        Raises:
          NonFiniteScoresError: a batch of this epoch held NaN/inf under
            ``nonfinite="raise"`` (the hooks never read the device per batch, so this is where
            it surfaces). The statistics of the clean batches are stored first: nothing
            collected is lost.
        """
        del trainer
        error = None
        try:
            self.hook.on_validation_epoch_end()
        except NonFiniteScoresError as e:
            error = e
        metrics = self._metrics(pl_module)
        write_stats(metrics, self.hook.stats_mode, self.hook.host_stats())
        pairs = stat_tensors(metrics, self.hook.stats_mode)
        tensors = tuple(t for pair in pairs.values() for _, t in pair)
        self._stats_source.remember(tensors, _contents_of(tensors))
        if error is not None:
            raise error

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """Sets the metrics' thresholds to 0.5 and loads the statistics (e.g. restored)."""
        del trainer
        for metrics in (
            getattr(pl_module, "image_metrics", None),
            getattr(pl_module, "pixel_metrics", None),
        ):
            if metrics is not None:
                metrics.set_threshold(0.5)
        self._share_rank0_stats(pl_module)
        self._load_stats(pl_module)
        self.hook.on_test_start()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """Loads the statistics (e.g. restored from a checkpoint)."""
        del trainer
        self._share_rank0_stats(pl_module)
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
        plan = self._plan
        if plan is not None and self._run_plan(plan, outputs, pl_module):
            return
        self._plan = None
        self._load_stats(pl_module)
        self._load_thresholds(pl_module)
        padded, rows = _pad_rows(outputs, self.hook._buckets, batching.NORMALIZE)
        if rows is None:
            plan = self._make_plan(outputs, pl_module)
            if plan is not None and self._run_plan(plan, outputs, pl_module):
                self._plan = plan
                return
        view = _JaxView(padded)
        normalized = self.hook.normalize_batch(view, boxes_on_host=True, valid_rows=rows)
        for key in view:
            like = outputs[key]
            if key == "box_scores" and isinstance(like, (list, tuple)):
                outputs[key] = [
                    host_to_torch(n, b).reshape(b.shape)
                    for n, b in zip(normalized[key], like, strict=True)
                ]
            else:
                out = to_torch(normalized[key], like)
                outputs[key] = out if rows is None else out[:rows]

    def _make_plan(self, outputs: Any, pl_module: Any) -> _Plan | None:
        """A plan for test batches laid out as ``outputs``, or ``None`` where the full path
        stays.

        Called with the thresholds and statistics loaded, on a batch that needs no padding.
        Raises what ``hook.normalize_batch`` would for such a batch (statistics missing,
        errors pending).
        """
        if type(outputs) is not dict:
            return None
        keys = tuple(key for key in NORMALIZED_KEYS if key in outputs)
        found = plan_tensors(self.hook, outputs, keys, batching.NORMALIZE)
        if found is None:
            return None
        tensors, device = found
        sources = self._sources(pl_module)
        if sources is None:
            return None
        self.hook._check_stats(keys)  # the errors of normalize_batch, in its order
        params = self.hook._device_params()
        shapes = tuple(tuple(t.shape) for t in tensors)
        dtypes = tuple(_NUMPY_DTYPES.get(t.dtype) for t in tensors)
        rowwise = device.type == "cpu" and hook_step.runs_rowwise(shapes, dtypes)
        fn = hook_step.normalize_positional(keys, rowwise)
        return _Plan(keys, tensors, device, fn=fn, params=params, sources=sources)

    def _run_plan(self, plan: _Plan, outputs: Any, pl_module: Any) -> bool:
        """Normalizes ``outputs`` in place by ``plan``; ``False`` (nothing done) when the
        batch or the hook's state does not match it."""
        hook = self.hook
        if hook._params is not plan.params or hook._unchecked:
            return False  # statistics or thresholds changed in the hook, or errors pending
        tensors = plan.tensors(outputs)
        if tensors is None or not self._sources_unchanged(pl_module, plan.sources):
            return False
        stream = _dlpack.torch_stream(plan.device)  # one look-up for both crossings
        arrays = _dlpack.import_batch(tensors, plan.device, stream)
        normalized = plan.fn(plan.params, *arrays)
        exported = _dlpack.export_batch(normalized, plan.device, stream)
        for key, t in zip(plan.keys, exported, strict=True):
            outputs[key] = t
        return True

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
