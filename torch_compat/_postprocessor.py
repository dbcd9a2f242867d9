"""The jaxnorm side of ``torch_compat.anomalib2.PostProcessor``; imports no anomalib.

``JaxState`` folds validation batches into a ``jaxnorm.MinMaxNormalizationHook`` (separate
image and pixel statistics, as anomalib 2 keeps them, and the F1 adaptive thresholds of
``pred_score``/``gt_label`` and ``anomaly_map``/``gt_mask``, in the same dispatch), stores
them in anomalib's buffers at validation epoch end, and normalizes and labels test and
predict batches with ``jaxnorm._src.anomalib2_normalize`` in one dispatch per batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from jaxnorm import MinMaxNormalizationHook, NonFiniteScoresError
from jaxnorm._src import anomalib2_normalize, f1_epoch, validation
from jaxnorm._src.stats import IMAGE, PIXEL, stats_sources
from jaxnorm._src.validation import NonFinitePolicy
from torch_compat import _allreduce, _change, _dlpack
from torch_compat._change import Watched
from torch_compat._dlpack import to_jax
from torch_compat._exchange import PLAN_DTYPES, batch_device, exchangeable
from torch_compat._lifecycle import validation_epoch_end
from torch_compat._steady import fold_validation_batch
from torch_compat._tensors import write_in_place

# anomalib 2's batch fields, and the 0.x keys under which the hook takes them.
SCORE, MAP = "pred_score", "anomaly_map"
_HOOK_KEYS = {SCORE: "pred_scores", MAP: "anomaly_maps"}
_FIELDS = {v: k for k, v in _HOOK_KEYS.items()}
# (statistic, its buffers) as anomalib 2's PostProcessor names them.
_BUFFERS = ((IMAGE, ("image_min", "image_max")), (PIXEL, ("pixel_min", "pixel_max")))
_LABELS = ((SCORE, "pred_label", "image_sensitivity"), (MAP, "pred_mask", "pixel_sensitivity"))
# The F1 thresholds: (scores field, labels field, hook key of the labels, anomalib's buffer).
_TRUTH = (
    (SCORE, "gt_label", "label", "_image_threshold"),
    (MAP, "gt_mask", "mask", "_pixel_threshold"),
)


def exporting() -> bool:
    """Whether torch is tracing or exporting now: anomalib's torch formula must run then."""
    compiler = getattr(torch, "compiler", None)
    checks = (
        getattr(compiler, "is_compiling", None),
        getattr(compiler, "is_exporting", None),
        torch.jit.is_tracing,
        torch.jit.is_scripting,
        getattr(torch.onnx, "is_in_onnx_export", None),
        # is_fx_tracing logs a deprecation warning at each call; this one does not.
        getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None),
    )
    return any(check is not None and check() for check in checks)


def plain(tensors) -> bool:
    """Whether every tensor holds real values jax can read (not fake, functional or meta)."""
    for t in tensors:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return False
        # FakeTensor, FunctionalTensor and the like: proxies of tracers, not data.
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            if "torch._subclasses" in type(t).__module__ or "torch.fx" in type(t).__module__:
                return False
    return True


def plain_view(t: Any) -> Any:
    """``t`` as a plain ``torch.Tensor`` view when it is a subclass holding real data (anomalib
    2's ``anomaly_map`` is a torchvision ``tv_tensors.Mask``), so that the batch exchange
    takes it; anything else as it is."""
    if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor and plain((t,)):
        return t.as_subclass(torch.Tensor)
    return t


def as_output(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A result (exported from jax) on ``like``'s device, in anomalib 2's output dtype.

    anomalib returns float32 for float16/bfloat16/float32 scores and float64 for float64
    (jax without x64 computed it in float32: the cast back is all that can be done).
    """
    if out.device != like.device:
        out = out.to(like.device)
    want = torch.float64 if like.dtype == torch.float64 else out.dtype
    if out.dtype == torch.bool:
        want = torch.bool
    return out if out.dtype == want else out.to(want)


class JaxState:
    """What ``PostProcessor`` keeps beside anomalib's buffers: never pickled, never a module.

    Its caches follow the rule of ``_change``: anomalib's buffers and sensitivities are
    keyed by value on the host (read at every batch, ~0.2 us each), and on an accelerator
    the buffers travel with every batch (one ``torch.stack``), only their checks keyed.
    Copies and pickles drop every cache.
    """

    def __init__(self, nonfinite: NonFinitePolicy = "raise") -> None:
        self.nonfinite = validation.check_nonfinite(nonfinite)
        self.hook = MinMaxNormalizationHook(stats="separate", nonfinite=nonfinite, reducer=None)
        self._drop_caches()

    def _drop_caches(self) -> None:
        self._checked = Watched()  # the buffers check_buffers passed (their keys)
        self._params = None  # on the host: the buffers on jax, for the keys _checked holds
        self._sensitivities = Watched()
        self._cuts: tuple[Any, tuple[float, float]] | None = None
        self._plan = None  # the validation batches' layout (see fold_validation_batch)

    _CACHES = ("_checked", "_params", "_sensitivities", "_cuts", "_plan")

    def __getstate__(self) -> dict:
        # Copies (also copy.copy, which would share them) and pickles hold no cache: they
        # read again. The hook goes with its own state (shared by a shallow copy).
        return {k: v for k, v in self.__dict__.items() if k not in self._CACHES}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._drop_caches()

    # -- validation ------------------------------------------------------------------------

    def fold(self, batch: Any, *, statistics: bool, thresholds: bool) -> None:
        """Folds one validation batch: its scores' and maps' min/max (``statistics``), and
        with ``thresholds`` each F1 threshold whose scores and labels it holds (anomalib's
        metrics skip a batch without them); one dispatch, no host read.

        Raises:
          ValueError: labels that are not one per score (anomalib's metric would pair
            scores with other labels, or fail at epoch end).
        """
        present: dict[str, Any] = {}
        if statistics:
            for field in (SCORE, MAP):
                if (value := getattr(batch, field, None)) is not None:
                    present[_HOOK_KEYS[field]] = plain_view(value)
        routes = tuple(stats_sources(present, "separate")) if present else ()
        if thresholds:
            for field, truth, key, _ in _TRUTH:
                value, labels = getattr(batch, field, None), getattr(batch, truth, None)
                if value is not None and labels is not None:
                    present[_HOOK_KEYS[field]] = plain_view(value)
                    present[key] = plain_view(check_truth(field, value, truth, labels))
        f1_routes = f1_epoch.routes(present) if thresholds else ()
        if not routes and not f1_routes:
            return
        # anomalib's update is synchronous: the tensors are handed back once the fold has
        # read them (see hand_back).
        plan, self._plan = self._plan, None
        self._plan = fold_validation_batch(self.hook, present, plan, routes, f1_routes)

    def end_epoch(self, module: torch.nn.Module, *, statistics: bool, thresholds: bool) -> None:
        """Validation epoch end: reduce over DDP ranks, write anomalib's buffers, reset.

        With ``thresholds``, each F1 threshold that some batch fed (on any rank) is written
        into ``_image_threshold``/``_pixel_threshold``, as anomalib's metrics do when their
        ``update_called``. With ``statistics``, a statistic that saw no finite value keeps
        its buffers, as anomalib keeps them for a field no batch held.

        Labels other than 0 and 1 count as normal, as anomalib's metric counts them (its
        ``ImageBatch`` makes them bool anyway).

        Raises:
          NonFiniteScoresError: under ``nonfinite="raise"``, naming anomalib's field, after
            the thresholds and statistics of the clean batches are stored.
        """
        hook = self.hook
        reducer = _allreduce.epoch_reducer()
        hook.reducer = reducer
        try:
            with validation_epoch_end(hook) as stats:
                # A collective with a reducer: every rank computes, whatever it saw (the
                # option is the same on every rank).
                result = hook.adapter.f1_result(reducer) if thresholds else None
                for which, (_, _, _, name) in zip((IMAGE, PIXEL), _TRUTH, strict=True):
                    value = None if result is None else result.thresholds[which]
                    if value is not None:
                        write_in_place(getattr(module, name), value)
                for which, names in _BUFFERS:
                    lo, hi = stats[which]
                    if statistics and lo <= hi:  # (+inf, -inf): nothing folded
                        for name, value in zip(names, (lo, hi), strict=True):
                            write_in_place(getattr(module, name), value)
                hook.reset()  # the statistics and the F1 states, with their stored scores
        except NonFiniteScoresError as e:
            raise _renamed(e) from None

    # -- test, predict and forward ---------------------------------------------------------

    def buffers(self, module: Any) -> tuple[Any, torch.Tensor | None]:
        """anomalib's buffers as ``anomalib2_normalize.postprocess`` takes them, checked:
        ``(jax array, None)`` on the host, made once per change of their values; ``(None,
        tensor)`` on an accelerator, gathered now (one ``torch.stack``) to cross with the
        batch, checked once per change of their keys."""
        tensors = tuple(getattr(module, name) for name in anomalib2_normalize.BUFFERS)
        keys = _change.keys(tensors)
        if not self._checked.unchanged(tensors, keys):
            check_buffers(module)  # reads them on the host: once per change
            self._params = None
            self._checked.remember(tensors, keys)
        dtypes = {t.dtype for t in tensors}
        dtype = dtypes.pop() if len(dtypes) == 1 and dtypes <= PLAN_DTYPES else torch.float32
        if _change.on_device(tensors) is not None:
            return None, _change.gather(tensors, dtype)
        if not _change.all_on_host(tensors):  # a mix of devices: read, never cached
            return to_jax(_change.gather([t.cpu() for t in tensors], dtype)), None
        if self._params is None:
            self._params = to_jax(_change.gather(tensors, dtype), name="PostProcessor buffers")
        return self._params, None

    def cuts(self, module: Any) -> tuple[Any, tuple[float, float]]:
        """The label thresholds ``1 - sensitivity`` (float32, anomalib's properties), keyed
        by the sensitivities' values (numbers, numpy arrays and host tensors: read at every
        batch; a sensitivity on an accelerator has no value key, and is read every batch)."""
        sens = (module.image_sensitivity, module.pixel_sensitivity)
        keys = _change.keys(sens) if _change.all_on_host(sens) else None
        if self._cuts is None or not self._sensitivities.unchanged(sens, keys):
            values = (
                float(module.normalized_image_threshold),
                float(module.normalized_pixel_threshold),
            )
            self._cuts = (values, np.array(values, np.float32))
            self._sensitivities.remember(sens, keys)
        return self._cuts[1], self._cuts[0]

    def process(
        self, module: Any, values: Mapping[str, torch.Tensor], labels: bool
    ) -> dict[str, torch.Tensor]:
        """Normalizes ``values`` (``pred_score``/``anomaly_map``) and, with ``labels``, adds
        ``pred_label``/``pred_mask`` for them: one dispatch."""
        cuts, host_cuts = self.cuts(module)
        wanted = []
        nan_cut = {}
        if labels:
            for (field, label, _), cut in zip(_LABELS, host_cuts, strict=True):
                if field in values:
                    if math.isnan(cut):  # anomalib returns the scores themselves
                        nan_cut[field] = label
                    else:
                        wanted.append((field, label))
        keys = tuple(values)
        tensors = [plain_view(values[k]) for k in keys]
        params, gathered = self.buffers(module)
        device = batch_device(tensors)
        if device is not None:  # one stream ordering for the batch, each way
            stream = _dlpack.torch_stream(device)
            crossing = [exchangeable(t) for t in tensors]
            if gathered is not None and gathered.device == device:
                *arrays, params = _dlpack.import_batch([*crossing, gathered], device, stream)
            else:
                arrays = _dlpack.import_batch(crossing, device, stream)
        else:
            arrays = [to_jax(t, name=f"batch.{k}") for k, t in zip(keys, tensors, strict=True)]
        if params is None:  # gathered on another device than the batch's
            params = to_jax(gathered, name="PostProcessor buffers")
        out = anomalib2_normalize.postprocess(
            dict(zip(keys, arrays, strict=True)),
            params,
            cuts,
            tuple(wanted),
            matching=bool(module.enable_threshold_matching),
        )
        if device is not None:
            exported = _dlpack.export_batch(list(out.values()), device, stream)
        else:
            exported = [torch.from_dlpack(y) for y in out.values()]
        result = {}
        for key, t in zip(out, exported, strict=True):
            field = key if key in values else dict((lb, f) for f, lb in wanted)[key]
            result[key] = as_output(t, values[field])
        for field, label in nan_cut.items():
            result[label] = result[field]
        return result


def check_truth(field: str, value: Any, truth: str, labels: Any) -> Any:
    """``labels`` (anomalib's ``gt_label`` or ``gt_mask``) when the F1 threshold can take them
    with ``value`` (the ``pred_score`` or ``anomaly_map`` they label), read on the host
    without waiting (type, dtype and shape only). Any real dtype is taken, as anomalib's
    metric takes it (``target == 1`` is anomalous).

    Raises:
      ValueError: not a real-valued tensor, or not one label per score along the batch
        axis, naming both fields.
    """
    if not isinstance(labels, torch.Tensor) or labels.is_complex():
        what = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"batch.{truth}: expected a tensor of real labels, got {what}; anomalib's "
            "batches hold their ground truth as bool tensors."
        )
    if not isinstance(value, torch.Tensor):
        return labels  # the exchange names what is wrong with the scores
    s, y = tuple(value.shape), tuple(labels.shape)
    if value.numel() != labels.numel() or (s[:1] != y[:1] and s and y):
        raise ValueError(
            f"batch.{truth} has shape {y} but batch.{field} has shape {s}: the F1 threshold "
            "needs one label per score, along the same batch axis."
        )
    return labels


def check_buffers(module: Any) -> None:
    """Checks anomalib's buffers (read on the host, once per change) before they are used.

    NaN is anomalib 2's "not set": NaN statistics pass scores through unchanged, a NaN
    threshold falls back to the midpoint. Any other value goes through the check of every
    statistic that enters jaxnorm from outside (``validation.loaded_stats``): finite, one
    number, in float32's range and ``max >= min``. anomalib would normalize with anything.

    Raises:
      ValueError: naming the buffer and its value, and what to do.
    """
    for _, (lo_name, hi_name) in _BUFFERS:
        lo, hi = getattr(module, lo_name), getattr(module, hi_name)
        for name, value in ((lo_name, lo), (hi_name, hi)):
            if value.numel() != 1:
                raise ValueError(
                    f"post_processor: '{name}' has shape {tuple(value.shape)}; anomalib's "
                    "buffers are 0-d: load a checkpoint of an anomalib >= 2 model."
                )
        lo_v, hi_v = lo.item(), hi.item()
        if math.isnan(lo_v) or math.isnan(hi_v):
            continue
        lo_v, hi_v = validation.loaded_stats("post_processor", lo_name, lo_v, hi_name, hi_v)
        if lo_v > hi_v:  # the empty pair (+inf, -inf), which loaded_stats lets through
            raise ValueError(
                f"post_processor: '{lo_name}' is {lo_v} and '{hi_name}' is {hi_v}: no scores "
                "give these statistics; validate again or load the buffers that were saved."
            )
    for name in ("_image_threshold", "_pixel_threshold"):
        value = getattr(module, name)
        if value.numel() != 1:
            raise ValueError(f"post_processor: '{name}' has shape {tuple(value.shape)}.")
        if not math.isnan(value.item()):
            validation.check_threshold(f"post_processor: '{name}'", value.item())


def _renamed(e: NonFiniteScoresError) -> NonFiniteScoresError:
    """The hook's error, naming anomalib 2's field (``pred_score``) instead of the 0.x key."""
    field = _FIELDS.get(e.key, e.key)
    match = re.search(re.escape(f"'{e.key}'") + r"(.*?); ", str(e))
    where = match.group(1) if match else ""
    # Under DDP a rank that saw none of the values names no field ("validation outputs").
    label = f"batch.{field}" if field in _HOOK_KEYS else field
    renamed = NonFiniteScoresError(label, e.count, where)
    renamed.key = field
    return renamed
