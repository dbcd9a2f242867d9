"""The steady paths: what the first batch of a layout settled is not done again.

A loop hands over batches of the same keys, dtypes, shapes and device (and, in test and
predict, the same thresholds and statistics). The first such batch takes the full path,
which runs every check and names what is wrong, then leaves a plan behind. A later batch
that matches it (its ``Layout`` compared on the host; in test and predict also its sources,
see ``_change``) skips what the first one established:

- validation (``fold_validation_batch``): one import per key feeding the statistics (and,
  for anomalib 2's ``PostProcessor``, the F1 thresholds' scores and labels), with one stream
  ordering, and the hook's one jitted fold;
- test and predict (``normalize_steady``): one import per key with one stream ordering, one
  jitted call for every key, and one zero-copy export per key.

The thresholds and statistics of test and predict follow the cache rule of ``_change``: on
the host the plan keeps the hook's device parameters while the sources' values are equal; on
an accelerator the sources' values travel with every batch (``gather``: one ``torch.stack``,
imported with the batch), and the plan keeps only what the host checked. Sources on an
accelerator that cannot travel with a batch (another device) get no plan: the adapter reads
them (``travels``).

Anything else takes the full path. Only float tensors without ``box_scores``, needing no
padding, on a device with the direct DLPack calls (``_dlpack.batch_device_ok``) get a plan.
These functions take the adapter's ``MinMaxNormalizationHook`` and drive it through its
public API and ``hook.adapter``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from jaxnorm import MinMaxNormalizationHook
from jaxnorm._src import batching, fused
from jaxnorm._src.stats import NORMALIZED_KEYS, stats_sources
from torch_compat import _change, _dlpack
from torch_compat._change import Watched
from torch_compat._dlpack import host_to_torch, to_jax, to_torch
from torch_compat._exchange import (
    NUMPY_DTYPES,
    ROW_KEYS,
    JaxView,
    Layout,
    batch_device,
    hand_back,
    pad_rows,
    tensor_devices,
)

# Label dtypes a plan imports as they are (``_dlpack.import_batch`` takes them zero-copy).
_LABEL_DTYPES = frozenset({torch.bool, torch.int32, torch.float32, torch.float16, torch.bfloat16})


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
    buckets = hook.adapter.buckets
    if any(
        buckets.rows(phase, k, t.shape[0]) != t.shape[0] for k, t in zip(keys, tensors, strict=True)
    ):
        return None
    return tensors, device


# -- validation -----------------------------------------------------------------------------


class ValidationPlan:
    """A validation layout: the keys feeding the statistics and the F1 thresholds (scores,
    then labels), and their routes."""

    __slots__ = ("layout", "routes", "f1_routes")

    def __init__(self, layout: Layout, routes: tuple, f1_routes: tuple = ()) -> None:
        self.layout = layout
        self.routes = routes
        self.f1_routes = f1_routes

    @property
    def all_routes(self) -> tuple:
        return self.routes, self.f1_routes


def _label_ok(t: Any, device: torch.device, rows: int) -> bool:
    """Whether a label tensor can cross with a plan's tensors, as it is."""
    return (
        type(t) is torch.Tensor
        and t.dtype in _LABEL_DTYPES
        and t.ndim > 0
        and t.shape[0] == rows
        and t.device == device
        and t.is_contiguous()
    )


def validation_plan(
    hook: MinMaxNormalizationHook, outputs: Any, routes: tuple | None = None, f1_routes=()
) -> ValidationPlan | None:
    """A plan for validation batches laid out as ``outputs`` (just folded by the full path,
    unpadded), or ``None`` where the full path stays. ``routes`` and ``f1_routes`` as
    ``fold_validation_batch`` takes them."""
    if type(outputs) is not dict:
        return None
    if routes is None:
        routes = tuple(stats_sources(outputs, hook.stats_mode))
    keys = tuple(dict.fromkeys([k for _, k in routes] + [k for _, k, _ in f1_routes]))
    found = plan_tensors(hook, outputs, keys, batching.VALIDATION)
    if found is None:
        return None
    tensors, device = found
    label_keys = tuple(label for _, _, label in f1_routes)
    labels = [outputs[key] for key in label_keys]
    if not all(_label_ok(t, device, tensors[0].shape[0]) for t in labels):
        return None
    present = tuple(key for key in NORMALIZED_KEYS if key in outputs)
    layout = Layout(keys + label_keys, [*tensors, *labels], device, present=present)
    return ValidationPlan(layout, routes, f1_routes)


def fold_validation_batch(
    hook: MinMaxNormalizationHook,
    outputs: Any,
    plan: ValidationPlan | None,
    routes: tuple | None = None,
    f1_routes: tuple = (),
) -> ValidationPlan | None:
    """Folds one validation batch's outputs into ``hook``; returns the plan for the next.

    A batch that matches ``plan`` takes the steady path: one import per key feeding the
    statistics and the F1 thresholds (one stream ordering) and the hook's one jitted fold.
    Any other batch takes the full path (padding, every check, the errors that name what is
    wrong) and, when it needed no padding, leaves a plan for its layout. Either way the
    tensors are handed back to torch once the fold has read them (``hand_back``).

    Args:
      routes: the statistics the batch feeds (``stats_sources``' routes, or ``()``);
        ``None``: the hook's own (``on_validation_batch_end``, the callbacks' case).
      f1_routes: the F1 thresholds it feeds (``f1_epoch.routes``), with ``routes`` given.
    """
    if plan is not None and (routes is None or (routes, f1_routes) == plan.all_routes):
        tensors = plan.layout.tensors(outputs)
        if tensors is not None:
            arrays = _dlpack.import_batch(tensors, plan.layout.device)
            values = dict(zip(plan.layout.keys, arrays, strict=True))
            hook.adapter.fold_arrays(values, plan.routes, None, plan.f1_routes)
            hand_back(hook, (plan.layout.device,))
            return plan
    labels = tuple(label for _, _, label in f1_routes)
    padded, n = pad_rows(outputs, hook.adapter.buckets, batching.VALIDATION, ROW_KEYS + labels)
    view = JaxView(padded, labels)
    if routes is None:
        hook.on_validation_batch_end(view, valid_rows=n)
    else:
        hook.adapter.fold_outputs(view, routes, f1_routes, n)
    hand_back(hook, view.devices)
    return validation_plan(hook, outputs, routes, f1_routes) if n is None else None


# -- test and predict -----------------------------------------------------------------------


def travels(gather: tuple | None, outputs: Any) -> bool:
    """Whether ``gather`` (the thresholds' and statistics' tensors on one accelerator, image
    ``t, min, max`` then pixel) can travel with ``outputs``: their tensors are all on it."""
    return gather is not None and tensor_devices(outputs) == {gather[0].device}


def route_values(values: tuple, outputs: Any) -> tuple[tuple | None, bool]:
    """How a test batch gets its thresholds and statistics, by the rule of ``_change``.

    Args:
      values: the thresholds' and statistics' values as the adapter holds them, image
        ``t, min, max`` then pixel (tensors or numbers), already loaded into the hook.
      outputs: the batch.

    Returns:
      ``(gather, read)``: ``gather`` is ``values`` when they are tensors on one accelerator
      with the batch (they travel: pass it to ``normalize_full``), else ``None``; ``read``
      says that they are on an accelerator but cannot travel with this batch (another
      device, or a mix with host numbers): the adapter must read them into the hook now
      (forget its links, load again), a host sync for this batch.
    """
    gather = values if _change.on_device(values) is not None else None
    if travels(gather, outputs):
        return gather, False
    return None, not _change.all_on_host(values)


def gathered(gather: tuple) -> torch.Tensor:
    """``[[t, min, max] image, [t, min, max] pixel]`` as one float32 tensor on their device
    (one ``torch.stack``; the reshape is a view)."""
    return _change.gather(gather, torch.float32).reshape(2, 3)


class TestPlan:
    """A test layout: the jitted call, the packed thresholds and statistics it takes (the
    hook's; or, with ``gather``, the tensors whose values travel with each batch), and the
    sources they were read from (``Watched``: objects by identity, keys by equality)."""

    __test__ = False  # not a pytest class

    __slots__ = ("layout", "fn", "params", "sources", "gather")

    def __init__(self, layout: Layout, fn, params, sources: Watched, gather=None) -> None:
        self.layout = layout
        self.fn = fn
        self.params = params
        self.sources = sources
        self.gather = gather

    @property
    def keys(self) -> tuple[str, ...]:
        return self.layout.keys

    @property
    def device(self) -> torch.device:
        return self.layout.device


def make_test_plan(
    hook: MinMaxNormalizationHook,
    outputs: Any,
    sources: tuple | None,
    gather: tuple | None = None,
) -> TestPlan | None:
    """A plan for test batches laid out as ``outputs``, or ``None`` where the full path
    stays.

    Called with the thresholds and statistics loaded, on a batch that needs no padding.
    Raises what ``hook.normalize_batch`` would for such a batch (statistics missing, errors
    pending).

    Args:
      sources: ``(objects, keys)`` the thresholds and statistics were read from, or ``None``
        when a key is unknown (such sources are read at every batch: no plan).
      gather: the thresholds' and statistics' tensors (image ``t, min, max``, then pixel)
        when all are on one accelerator: their values travel with each batch. ``None``: on
        the host (or not all tensors); sources on an accelerator that cannot travel with
        this batch get no plan.
    """
    if type(outputs) is not dict:
        return None
    keys = tuple(key for key in NORMALIZED_KEYS if key in outputs)
    found = plan_tensors(hook, outputs, keys, batching.NORMALIZE)
    if found is None or sources is None:
        return None
    tensors, device = found
    if gather is not None and not travels(gather, outputs):
        return None
    if gather is None and not _change.all_on_host(sources[0]):
        return None  # values on an accelerator that cannot travel: read at every batch
    params = hook.adapter.normalize_params(keys)  # the errors of normalize_batch, in its order
    shapes = tuple(tuple(t.shape) for t in tensors)
    dtypes = tuple(NUMPY_DTYPES.get(t.dtype) for t in tensors)
    rowwise = device.type == "cpu" and fused.runs_rowwise(shapes, dtypes)
    fn = fused.normalize_positional(keys, rowwise)
    watched = Watched()
    watched.remember(*sources)
    return TestPlan(Layout(keys, tensors, device), fn, params, watched, gather)


def normalize_steady(
    hook: MinMaxNormalizationHook, plan: TestPlan, outputs: Any, sources: tuple | None
) -> bool:
    """Normalizes ``outputs`` in place by ``plan``; ``False`` (nothing done) when the batch,
    the hook's state or the ``sources`` (as ``make_test_plan`` takes them) do not match it."""
    if not hook.adapter.params_current(plan.params):
        return False  # statistics or thresholds changed in the hook, or errors pending
    tensors = plan.layout.tensors(outputs)
    if tensors is None or sources is None or not plan.sources.unchanged(*sources):
        return False
    device = plan.layout.device
    stream = _dlpack.torch_stream(device)  # one look-up for both crossings
    if plan.gather is None:
        arrays = _dlpack.import_batch(tensors, device, stream)
        params = plan.params
    else:  # the values travel with the batch, in the same import
        *arrays, params = _dlpack.import_batch([*tensors, gathered(plan.gather)], device, stream)
    normalized = plan.fn(params, *arrays)
    exported = _dlpack.export_batch(normalized, device, stream)
    for key, t in zip(plan.layout.keys, exported, strict=True):
        outputs[key] = t
    return True


def normalize_full(
    hook: MinMaxNormalizationHook,
    outputs: Any,
    sources: tuple | None,
    gather: tuple | None = None,
) -> TestPlan | None:
    """Normalizes ``outputs`` in place through the full path (the hook loaded with the
    thresholds and statistics); returns a plan for later batches of this layout, or
    ``None``. ``sources`` and ``gather`` as ``make_test_plan`` takes them: values that can
    travel with this batch do, here too.

    A batch of a new, odd size is padded in torch and sliced back as a view.
    """
    padded, rows = pad_rows(outputs, hook.adapter.buckets, batching.NORMALIZE)
    if rows is None:
        plan = make_test_plan(hook, outputs, sources, gather)
        if plan is not None and normalize_steady(hook, plan, outputs, sources):
            return plan
    params = None
    if travels(gather, outputs):
        params = to_jax(gathered(gather), name="thresholds and statistics")
    view = JaxView(padded)
    normalized = hook.adapter.normalize_batch(view, params, boxes_on_host=True, valid_rows=rows)
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
    return None


def normalize_test_batch(
    hook: MinMaxNormalizationHook,
    plan: TestPlan | None,
    outputs: Any,
    *,
    sources: Callable[[], tuple | None],
    values: Callable[[], tuple],
    load: Callable[[], None],
    forget: Callable[[], None],
) -> TestPlan | None:
    """Normalizes one test or predict batch in place, by the cache rule of ``_change``, and
    returns the plan for the next batch (the adapters' shared test path).

    The steady path where ``plan`` still holds for ``outputs`` and the current ``sources()``;
    else the full path: ``load()`` reads the thresholds and statistics into the hook where
    they changed; values on one accelerator with the batch travel with it (``route_values``),
    and values on an accelerator that cannot travel with it are read again (``forget()``,
    then ``load()``: a host sync for this batch).

    An adapter drops its plan before the call (``plan, self._plan = self._plan, None``), so
    that a batch that raises leaves none.
    """
    if plan is not None and normalize_steady(hook, plan, outputs, sources()):
        return plan
    load()
    gather, read = route_values(values(), outputs)
    if read:  # on an accelerator, but they cannot travel with this batch
        forget()
        load()
    return normalize_full(hook, outputs, sources(), gather)
