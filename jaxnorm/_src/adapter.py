"""``HookAdapter``: what the Lightning adapters (``torch_compat``) use of a hook beyond its
public API.

Every ``MinMaxNormalizationHook`` has one, as ``hook.adapter``. The adapters drive the hook
through it and the public API only, never through the hook's private names. Each method keeps
the hook's own rules (its checks, caches and pending errors), so no adapter holds a copy of
them:

- ``buckets``: the leading sizes batches run at (an adapter that pads in torch pads to them);
- ``fold_outputs``: fold a validation batch's outputs, checked and padded, with the routes
  the adapter chose (its statistics, and the F1 thresholds it feeds), one dispatch;
- ``fold_arrays``: fold arrays already checked (a steady validation batch), one dispatch;
- ``f1_result``: the epoch's F1 thresholds (``f1_epoch.Result``), then their states dropped;
- ``last_fold``: an array the last fold made (ready once the fold has read its inputs);
- ``normalize_batch``: the hook's ``normalize_batch``, optionally with parameters the adapter
  gathered itself (values that travel with the batch);
- ``normalize_params``: the device parameters of the test call, after its checks;
- ``params_current``: whether such parameters are still the ones the hook would use;
- ``load_stats``: check statistics from outside once, and install them (one transfer).

Beside these, ``hook.stats`` is a new object whenever the statistics change (a fold, a load,
a reset) and the same one while they do not: an adapter that loaded them from somewhere
compares it by identity to know that the hook still holds what it loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxnorm._src import batch_io, batching, errors, f1_epoch, f1_inputs, fused, validation
from jaxnorm._src.device_state import DeviceState
from jaxnorm._src.stats import NORMALIZED_KEYS, mode_after_load


class HookAdapter:
    """A hook's adapter interface (see the module docstring); made by the hook itself."""

    def __init__(
        self,
        hook: Any,
        device: DeviceState,
        buckets: batching.Buckets,
        thresholds: Mapping[str, float],
    ) -> None:
        self._hook = hook  # read for its public options: nonfinite, stats_mode
        self._device = device
        self._thresholds = thresholds  # the hook's dict, kept up to date by its setters
        self.buckets = buckets

    def fold_outputs(
        self,
        outputs: Mapping,
        routes: tuple,
        f1_routes: tuple = (),
        valid_rows: int | None = None,
    ) -> None:
        """Checks, pads and folds a validation batch: one jitted dispatch, no host read.

        Args:
          outputs: the batch's outputs (the hook's keys).
          routes: ``stats.stats_sources`` of the batch, as a tuple (``()``: no statistics).
          f1_routes: the F1 thresholds it feeds, ``f1_epoch.routes`` (or fewer).
          valid_rows: as ``on_validation_batch_end``'s.

        Raises:
          ValueError: naming the key whose value is not a numeric array, or labels that do
            not hold one label per score.
        """
        f1_epoch.check_pairs(outputs, f1_routes)
        keys = list(dict.fromkeys([k for _, k in routes] + [k for _, k, _ in f1_routes]))
        labels = {label: score for _, score, label in f1_routes}
        values, rows = batch_io.validation_arrays(
            outputs, keys + list(labels), self.buckets, valid_rows, labels
        )
        if f1_routes:  # the F1 states count with scatter-adds (see f1_inputs.auto_axes_view)
            f1_keys = [*dict.fromkeys(k for _, k, _ in f1_routes), *labels]
            views = f1_inputs.auto_axes_view("thresholds", *(values[k] for k in f1_keys))
            values.update(zip(f1_keys, views, strict=True))
        self.fold_arrays(values, routes, rows, f1_routes)

    def fold_arrays(
        self,
        values: Mapping[str, Any],
        routes: tuple,
        rows: Mapping[str, Any] | None = None,
        f1_routes: tuple = (),
    ) -> None:
        """Folds arrays that are already checked: one jitted dispatch, no host read.

        Args:
          values: the arrays of the keys in ``routes`` and ``f1_routes`` (what
            ``fold_outputs`` makes of a batch, or DLPack imports of tensors of the same
            layout).
          routes: ``stats.stats_sources`` of the batch, as a tuple.
          rows: the int32 number of real rows of each padded key (default: none padded).
          f1_routes: the F1 thresholds the batch feeds (``f1_epoch.routes``).
        """
        omit = self._hook.nonfinite == "omit"
        self._device.fold(values, routes, rows or {}, omit=omit, f1_routes=f1_routes)

    def f1_result(self, reducer=None) -> f1_epoch.Result:
        """The F1 thresholds of the batches folded since the last call or reset
        (``f1_epoch.EpochF1.compute``; with ``reducer``, a collective over processes), in
        raw units; their states are dropped after."""
        return self._device.f1_result(reducer)

    def last_fold(self) -> jax.Array:
        """An array the last fold computed: once it is ready, the fold has read its inputs
        (an adapter hands imported tensors back to their framework after it)."""
        return self._device.counters

    def normalize_batch(
        self,
        outputs: Mapping,
        params: jax.Array | None = None,
        *,
        boxes_on_host: bool = False,
        valid_rows: int | None = None,
    ) -> dict:
        """``hook.normalize_batch`` (see there), with ``params`` when given: the
        ``[[t, min, max] image, [t, min, max] pixel]`` of this batch, on its device, instead
        of the hook's own (an adapter's values that travel with the batch). The checks are
        the hook's, on the statistics it holds."""
        present = [key for key in NORMALIZED_KEYS if key in outputs]
        if not present:
            raise ValueError(errors.NO_VALUES_MESSAGE)
        self._device.check(present, shared=self._hook.stats_mode == "shared")
        arrays = batch_io.NormalizeArrays(outputs, present, self.buckets, valid_rows)
        if params is None:
            params = self._device.params(self._thresholds)
        normalized = fused.normalize_all(arrays.values, params)
        return arrays.results(normalized, boxes_on_host=boxes_on_host)

    def normalize_params(self, keys: Iterable[str]) -> jax.Array:
        """The device array ``normalize_batch`` normalizes ``keys`` with,
        ``[[t, min, max] image, [t, min, max] pixel]``, after its checks.

        Raises:
          What ``normalize_batch`` raises for pending errors and missing statistics, in its
          order.
        """
        self._device.check(keys, shared=self._hook.stats_mode == "shared")
        return self._device.params(self._thresholds)

    def params_current(self, params: jax.Array) -> bool:
        """Whether ``params`` (from ``normalize_params``) are what ``normalize_batch`` would
        use now: no threshold or statistic changed since, and no error is pending."""
        return self._device.params_current(params)

    def load_stats(
        self,
        source: str,
        pairs: Mapping[str, tuple[Any, Any]],
        keys: Mapping[str, tuple[str, str]] | None = None,
    ) -> dict[str, tuple[float, float]]:
        """Checks statistics that come from outside and installs them (one transfer), as
        ``set_stats`` does (statistics that differ make a shared hook separate), rounded to
        float32, where statistics live.

        Args:
          source: where they come from, for errors (e.g. ``"checkpoint"``).
          pairs: ``{"image": (min, max), "pixel": (min, max)}``: numbers, or arrays or
            tensors of one element (read on the host; a pair given twice is read once).
          keys: each pair's names in ``source``, for errors.

        Returns:
          The installed values, ``{"image": (min, max), "pixel": (min, max)}`` (floats).

        Raises:
          ValueError: see ``validation.loaded_stats``; the hook is unchanged then.
        """
        host = validation.checked_stats(source, pairs, keys)
        host = {w: tuple(float(np.float32(v)) for v in pair) for w, pair in host.items()}
        self._device.install(host)
        self._hook.stats_mode = mode_after_load(self._hook.stats_mode, host)
        return host
