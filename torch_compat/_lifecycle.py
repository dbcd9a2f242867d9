"""Lifecycle helpers of the Lightning adapters: where the hook's thresholds and statistics
live outside it, and the validation epoch's end.

- ``validation_epoch_end``: ends the hook's epoch; the adapter stores the clean statistics
  in the body, and a non-finite error is raised after it (nothing collected is lost);
- ``StatsLink``: statistics held in tensors outside the hook (a metric's states, a
  checkpoint's buffers), read into the hook when they change, remembered when stored;
- ``ThresholdLink``: ``pl_module.image_threshold.value`` and ``pixel_threshold.value``
  (anomalib 0.x and 1.x), read into the hook when they change;
- ``share_rank0``: every DDP rank takes rank 0's values (after a checkpoint restore);
- ``AdapterCaches``: the caches an adapter keeps between batches, which copies drop.

Statistics are given as ``{"image": ((min_key, min), (max_key, max)), "pixel": ...}``, the
tensors themselves with the names to report them by (``_minmax.stat_tensors`` makes this of
any object with ``min``/``max`` tensors); shared statistics give the same pair twice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from jaxnorm import MinMaxNormalizationHook, NonFiniteScoresError
from torch_compat._allreduce import broadcast_from_rank0, ddp_active
from torch_compat._change import Watched, keys
from torch_compat._steady import (
    TestPlan,
    ValidationPlan,
    fold_validation_batch,
    normalize_test_batch,
)
from torch_compat._tensors import check_not_meta, write_in_place

StatPairs = Mapping[str, tuple[tuple[str, Any], tuple[str, Any]]]

_ATTRIBUTE_HINT = (
    "MinMaxNormalizationCallback reads anomalib's AnomalyModule attributes: give the module "
    "`image_threshold` and `pixel_threshold` objects whose `.value` is a 0-d tensor (raw-score "
    "units)."
)


@contextlib.contextmanager
def validation_epoch_end(hook: MinMaxNormalizationHook) -> Iterator[dict]:
    """Ends ``hook``'s validation epoch (its reducer, its pending errors) and yields the
    statistics to store, ``{"image": (min, max), "pixel": (min, max)}``.

    A ``NonFiniteScoresError`` of the epoch is raised after the body has stored them: the
    statistics of the clean batches are never lost.
    """
    error = None
    try:
        hook.on_validation_epoch_end()
    except NonFiniteScoresError as e:
        error = e
    yield hook.host_stats()
    if error is not None:
        raise error


def _tensors(pairs: StatPairs) -> tuple:
    return tuple(t for pair in pairs.values() for _, t in pair)


class StatsLink:
    """Statistics held in tensors outside the hook, and whether the hook holds their values.

    ``load`` reads them into the hook only when they changed since the last load or store;
    ``stored`` says that the hook's statistics were just written into them.

    Cache rule: a hit needs the same tensors with equal keys (``_change``: values on the
    host; identity, storage and version on an accelerator) *and* a hook that still holds
    what was loaded or stored: ``hook.stats`` is the very object it was then (a fold, a
    reset or any load since makes a new one, e.g. a validation epoch that was started and
    abandoned). Empty statistics (no validation yet) are read again at every load: the
    missing-statistics error is never a cached result. Copies of a link are empty
    (``Watched``).
    """

    def __init__(self) -> None:
        self._source = Watched()
        self._holds: object = None  # hook.stats when the hook held the tensors' values

    def forget(self) -> None:
        """Read them at the next ``load`` (a new run, or values that cannot travel)."""
        self._source.forget()
        self._holds = None

    def load(self, hook: MinMaxNormalizationHook, pairs: StatPairs, source: str) -> None:
        """Reads the statistics into ``hook`` when they changed (restored, written, replaced).

        Raises:
          ValueError: naming ``source``, the key and the value, for statistics on the meta
            device, not finite (other than the empty pair), not one number each, or with
            ``max < min``.
        """
        tensors = _tensors(pairs)
        found = keys(tensors)
        if self._source.unchanged(tensors, found) and hook.stats is self._holds:
            return
        for (lo_key, lo), (hi_key, hi) in pairs.values():
            check_not_meta(source, lo_key, lo)
            check_not_meta(source, hi_key, hi)
        installed = hook.adapter.load_stats(
            source,
            {which: (lo, hi) for which, ((_, lo), (_, hi)) in pairs.items()},
            {which: (lo_key, hi_key) for which, ((lo_key, _), (hi_key, _)) in pairs.items()},
        )
        self._source.remember(tensors, found)
        # Empty statistics are never a hit: the hook raises StatisticsMissingError for them,
        # and statistics written since without a key change (``.data`` on an accelerator)
        # must be read before it does.
        empty = any(lo > hi for lo, hi in installed.values())
        self._holds = None if empty else hook.stats

    def stored(self, pairs: StatPairs, hook: MinMaxNormalizationHook | None = None) -> None:
        """``hook``'s statistics were just written into ``pairs``' tensors (without
        ``hook``, the next ``load`` reads them again)."""
        tensors = _tensors(pairs)
        self._source.remember(tensors, keys(tensors))
        self._holds = None if hook is None else hook.stats


class ThresholdLink:
    """``pl_module.image_threshold.value`` and ``pixel_threshold.value``, read into the hook
    when they change.

    Cache rule: a hit needs the same object with an equal key (``_change``) *and* a hook
    whose threshold is still the value read (one set on the hook by hand is replaced).
    """

    NAMES = ("image_threshold", "pixel_threshold")

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """Read them at the next ``load``."""
        self._watched = {name: Watched() for name in self.NAMES}
        self._set: dict[str, float] = {}

    @classmethod
    def values(cls, pl_module: Any) -> list:
        """The thresholds' values as they are, image then pixel (``None`` where missing)."""
        return [getattr(getattr(pl_module, name, None), "value", None) for name in cls.NAMES]

    def load(self, hook: MinMaxNormalizationHook, pl_module: Any) -> None:
        """Sets ``hook``'s thresholds from ``pl_module``'s, reading those that changed.

        Raises:
          AttributeError: a threshold's ``.value`` is missing.
          ValueError: a value that is not one finite number in float32's range.
        """
        for name, watched in self._watched.items():
            try:
                value = getattr(pl_module, name).value
            except AttributeError:
                raise AttributeError(
                    f"pl_module.{name}.value is missing; {_ATTRIBUTE_HINT}"
                ) from None
            found = keys((value,))
            if watched.unchanged((value,), found) and getattr(hook, name) == self._set.get(name):
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(
                        f"pl_module.{name}.value: expected one number, got shape "
                        f"{tuple(value.shape)}."
                    )
                check_not_meta(f"pl_module.{name}", "value", value)
                number = value.item()
            else:
                number = value
            try:
                setattr(hook, name, number)
            except ValueError as error:
                raise ValueError(f"pl_module.{name}.value: {error}") from None
            watched.remember((value,), found)
            self._set[name] = getattr(hook, name)


def share_rank0(pairs: StatPairs) -> None:
    """Under DDP, every rank takes rank 0's values of ``pairs``' tensors, in place.

    After restoring a checkpoint, Lightning 1.x resets every torchmetrics ``Metric`` on the
    ranks other than 0 (their states are taken to be accumulated on rank 0), ours and
    anomalib's included; rank 0's are the checkpoint's. Every rank calls this at the same
    hooks (a collective); the values are checked afterwards, on every rank alike.
    """
    if not ddp_active():
        return
    tensors = list({id(t): t for t in _tensors(pairs)}.values())
    usable = [t.numel() == 1 and t.device.type != "meta" for t in tensors]
    local = [
        float(t.reshape(())) if ok else math.nan for t, ok in zip(tensors, usable, strict=True)
    ]
    for t, ok, value in zip(tensors, usable, broadcast_from_rank0(local), strict=True):
        if ok:
            write_in_place(t, value)


class AdapterCaches:
    """Mixin of the Lightning adapters: the caches they keep between batches, each under the
    rule of ``_change`` (``_stats`` and ``_thresholds``, links to where the statistics and
    thresholds live; ``_plan`` for test and predict batches and ``_validation_plan``, the
    steady paths' plans), and the batch paths that use them. Copies (``copy.copy`` too, which
    would share them) and pickles hold none: they read the module again and settle their own
    plans.

    An adapter has ``hook`` and ``_sources(pl_module)``, ``_values(pl_module)`` and
    ``_load_values(pl_module)`` (see ``_steady.normalize_test_batch``).
    """

    hook: MinMaxNormalizationHook

    def _init_caches(self) -> None:
        self._stats = StatsLink()
        self._thresholds = ThresholdLink()
        self._plan: TestPlan | None = None
        self._validation_plan: ValidationPlan | None = None

    def _forget_values(self) -> None:
        """Read the statistics and thresholds again at the next load."""
        self._stats.forget()
        self._thresholds.forget()

    def _fold_validation(self, outputs: Any) -> None:
        """Folds a validation batch (the steady path where the validation plan holds). The
        plan is dropped first, so that a batch that raises leaves none."""
        plan, self._validation_plan = self._validation_plan, None
        self._validation_plan = fold_validation_batch(self.hook, outputs, plan)

    def _normalize_test(self, outputs: Any, pl_module: Any) -> None:
        """Normalizes a test or predict batch in place (``_steady.normalize_test_batch``)."""
        plan, self._plan = self._plan, None
        self._plan = normalize_test_batch(
            self.hook,
            plan,
            outputs,
            sources=lambda: self._sources(pl_module),
            values=lambda: self._values(pl_module),
            load=lambda: self._load_values(pl_module),
            forget=self._forget_values,
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_stats=StatsLink(), _thresholds=ThresholdLink())
        state["_plan"] = state["_validation_plan"] = None
        return state

    @property
    def steady(self) -> bool:
        """Whether the next test or predict batch of the last layout may take the steady
        path (a plan is held); for tests and probes."""
        return self._plan is not None

    @property
    def plan(self) -> TestPlan | None:
        """The plan the last test or predict batch left (``None``: none held); for probes
        (``benchmarks/gpu/shim_probe.py`` times its steps)."""
        return self._plan
