"""``torch_compat.anomalib1.MinMaxNormalizationCallback`` against anomalib 1.x's own
``_MinMaxNormalizationCallback`` on a twin module, in a hypothesis state machine (issue 20).

Both modules are ``stand_in.Model``s (real ``AnomalyModule``s with anomalib's thresholds and
normalization metrics). Every batch goes to both callbacks and every mutation reaches both
modules alike: validation epochs (also abandoned ones), test and predict batches, and between
them any threshold or statistic written by any method of ``tests/tensor_writes.py`` (in place,
through ``.data``, numpy or DLPack aliases, ``.data =``, a new tensor), anomalib's
``load_state_dict`` and torch's with ``assign=True``, new metric objects, ``deepcopy`` and
pickle of the module and of the callback, dtype conversions of the module, ``setup`` again,
and output buffers written as soon as a hook returns. After each test or predict batch the
outputs must be anomalib's, and the module's values must be the twin's (the callback writes
the statistics at validation epoch end only). `make test-anomalib1` runs it with 1.2.0 (one
``MinMax`` per output) and 1.1.0 (one shared ``MinMax``).

What docs/anomalib1.md lists as differences is applied to the twin, not hidden: statistics
never collected raise instead of giving 0.5; an epoch that never ends leaves the statistics it
started from (anomalib's metrics keep its batches); and, with statistics held in float16 or
bfloat16 states, anomalib computes ``max - min`` in that dtype where jaxnorm uses float32: the
outputs may differ by what that rounding moves them (``bound``), and by nothing more.
Derandomized and bounded.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import numpy as np
import pytest
import stand_in
import torch
from anomalib.callbacks.normalization import _MinMaxNormalizationCallback
from anomalib.metrics import MinMax
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from stand_in import BOX, EMPTY, IMAGE, IMAGE_T, PER_OUTPUT, PIXEL, PIXEL_T, STATS, Model
from torchmetrics import MetricCollection

import jaxnorm
import torch_compat._change
from tests import tensor_writes
from tests.callback_machine import (
    batches,
    clone,
    machine_settings,
    stat_values,
    tensors_of,
    thresholds,
)
from torch_compat.anomalib1 import BoxScoresWarning, MinMaxNormalizationCallback

PREFIXES = tuple(dict.fromkeys((IMAGE, PIXEL, BOX)))  # one per MinMax
GAP = 0.125  # max - min at least this: bfloat16 cannot round a pair onto itself
CONVERSIONS = {
    "to(float16)": lambda m: m.to(torch.float16),
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "to(float64)": lambda m: m.to(torch.float64),
    "to(float32)": lambda m: m.to(torch.float32),
    "half()": lambda m: m.half(),  # torchmetrics keeps its states' dtype here
}
spans = st.floats(0.25, 3.0)
# Writes that leave a tensor's identity, storage and version counter as they were.
UNKEYED = ("data.fill_", "numpy alias", "dlpack alias")


def f32(value: float) -> float:
    """Statistics are float32 values (SPEC; anomalib's updates with float32 outputs make no
    others): a hand-made float64 one would be rounded at the next epoch end."""
    return float(np.float32(value))


def new_metrics(pairs: dict[str, tuple[float, float]]):
    """What anomalib's ``load_state_dict`` puts in ``normalization_metrics``: new instances."""

    def minmax(lo, hi):
        metric = MinMax()
        metric.min, metric.max = torch.tensor(lo), torch.tensor(hi)
        return metric

    if not PER_OUTPUT:
        return minmax(*pairs[IMAGE])
    return MetricCollection(
        {p.split(".")[1]: minmax(*pairs[p]) for p in (PIXEL, BOX, IMAGE)}  # anomalib's order
    )


def bound(module: Model, prefix: str) -> float | None:
    """How far jaxnorm's output may be from anomalib's for the statistic at ``prefix``:
    ``1e-6``, plus, for states of a reduced dtype, what computing ``max - min`` in it (as
    anomalib does, ``R_h``) moves a normalized value away from the float32 range ``R``
    (``|x - t| / R_h`` vs ``/ R`` over values in the unclipped band). ``None`` where
    anomalib divides by zero (a documented difference: see ``expected``)."""
    lo_t, hi_t = stand_in.tensor(module, prefix + "min"), stand_in.tensor(module, prefix + "max")
    lo, hi = float(lo_t), float(hi_t)
    if (lo, hi) == EMPTY:
        return 1e-6
    exact, rounded = hi - lo, float(hi_t - lo_t)
    if rounded == 0:
        return None
    return 1e-6 + 0.5 * abs(exact - rounded) / min(exact, rounded)


def zero_range(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """SPEC's normalization where ``max == min`` (anomalib's gives NaN/inf there): 0 below
    the threshold, 0.5 at it, 1 above it."""
    t = torch.tensor(threshold, dtype=torch.float64)
    return torch.where(x < t, 0.0, torch.where(x > t, 1.0, 0.5)).to(x.dtype)


def assert_close(got: dict, want: dict, raw: dict, bounds: dict) -> None:
    for key, tol in bounds.items():
        if key not in raw:
            continue
        triples = (
            zip(got[key], want[key], raw[key], strict=True)
            if key == "box_scores"
            else [(got[key], want[key], raw[key])]
        )
        for g, w, r in triples:
            assert isinstance(g, torch.Tensor), key
            assert g.dtype == r.dtype and g.shape == r.shape, (key, g.dtype, g.shape)
            np.testing.assert_allclose(
                g.double().numpy(), w.double().numpy(), atol=tol, rtol=0, err_msg=key
            )


class Anomalib1Machine(RuleBasedStateMachine):
    """Ours on ``self.module``, anomalib's on ``self.twin``."""

    ABANDON = False  # validation epochs may be left without their end
    ON_HOST = None  # a stand-in for _change.on_host (the accelerator rule), or None

    def __init__(self) -> None:
        super().__init__()
        self.module = None
        self._on_host = torch_compat._change.on_host
        if self.ON_HOST is not None:
            torch_compat._change.on_host = self.ON_HOST

    def teardown(self) -> None:
        torch_compat._change.on_host = self._on_host
        super().teardown()

    @initialize(
        image_t=thresholds,
        pixel_t=thresholds,
        loaded=st.one_of(st.none(), st.tuples(stat_values, spans)),
    )
    def start(self, image_t, pixel_t, loaded):
        """Fresh twins; ``loaded``: statistics already there (a checkpoint)."""
        self.module, self.twin = Model(image_t, pixel_t).attach(), Model(image_t, pixel_t).attach()
        self.cb, self.anomalib = MinMaxNormalizationCallback(), _MinMaxNormalizationCallback()
        self.setup_again("fit")
        self.phase = "idle"  # "validating", "testing" or "predicting"
        self.saved = None  # the twin's statistics at the epoch start (see abandon)
        self.index = 0
        if loaded is not None:
            for prefix in PREFIXES:
                self._write_pair(prefix, loaded[0], f32(loaded[0] + loaded[1]), "copy_")

    def both(self, fn) -> None:
        fn(self.module)
        fn(self.twin)

    # -- validation ----------------------------------------------------------------------------

    @precondition(lambda self: self.ABANDON or self.phase != "validating")
    @rule()
    def start_epoch(self):
        self._leave_epoch()
        self.cb.on_validation_epoch_start(None, self.module)
        self.anomalib.on_validation_epoch_start(None, self.twin)
        self.saved = {p: stand_in.tensor(self.twin, p).clone() for p in STATS}
        self.phase = "validating"

    def _leave_epoch(self) -> None:
        """An epoch left without its end: its batches never count (ours stores statistics
        at the end only; anomalib's metrics took them at each batch, so they are put back)."""
        if self.phase == "validating":
            for path, saved in self.saved.items():
                owner, name = tensor_writes.resolve(self.twin, path)
                setattr(owner, name, saved)
        self.saved = None

    @precondition(lambda self: self.phase == "validating")
    @rule(batch=batches(dtypes=(torch.float32, torch.float16)), reuse=st.booleans())
    def validation_batch(self, batch, reuse):
        self.index += 1
        self.anomalib.on_validation_batch_end(None, self.twin, clone(batch), None, self.index)
        self.cb.on_validation_batch_end(None, self.module, batch, None, self.index)
        if reuse:  # the caller's buffers, written as soon as the hook returned
            for t in tensors_of(batch):
                t.fill_(1e4)

    @precondition(lambda self: self.phase == "validating")
    @rule()
    def end_epoch(self):
        self.cb.on_validation_epoch_end(None, self.module)
        self.phase, self.saved = "idle", None
        got, want = stand_in.values_of(self.module), stand_in.values_of(self.twin)
        assert [got[p] for p in STATS] == [want[p] for p in STATS], (got, want)

    @precondition(lambda self: self.ABANDON or self.phase != "validating")
    @rule(
        batch_list=st.lists(batches(dtypes=(torch.float32, torch.float16)), min_size=1, max_size=3),
        complete=st.booleans(),
    )
    def validation_epoch(self, batch_list, complete):
        """A whole epoch in one step (or, where epochs may be abandoned, its start and some
        batches only)."""
        self.start_epoch()
        for batch in batch_list:
            self.validation_batch(batch, reuse=True)
        if complete or not self.ABANDON:
            self.end_epoch()

    # -- test and predict ----------------------------------------------------------------------

    def empty(self, prefix: str) -> bool:
        return stand_in.pair(self.twin, prefix) == EMPTY

    @precondition(lambda self: self.ABANDON or self.phase != "validating")
    @rule(predict=st.booleans())
    def start_test(self, predict):
        self._leave_epoch()
        if predict:
            self.cb.on_predict_start(None, self.module)
            self.phase = "predicting"
            return
        self.phase = "testing"
        self.anomalib.on_test_start(None, self.twin)
        if self.empty(IMAGE) and self.empty(PIXEL):  # ours raises where anomalib gives 0.5
            with pytest.raises(jaxnorm.StatisticsMissingError):
                self.cb.on_test_start(None, self.module)
        else:
            self.cb.on_test_start(None, self.module)
            assert self.module.image_metrics.threshold == 0.5

    @precondition(lambda self: self.phase in ("testing", "predicting"))
    @rule(data=st.data(), reuse=st.booleans())
    def test_batch(self, data, reuse):
        outputs = data.draw(batches())
        self.index += 1
        raw = clone(outputs)
        given = tensors_of(outputs)
        predict = self.phase == "predicting"
        hook = self.cb.on_predict_batch_end if predict else self.cb.on_test_batch_end
        needs = [IMAGE] + [PIXEL] * ("anomaly_maps" in raw)
        if "box_scores" in raw and not PER_OUTPUT:
            needs.append(BOX)  # shared: the hook normalizes them (1.1.1+: 0.5 when empty)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BoxScoresWarning)  # said once; test_hooks checks it
            if any(self.empty(p) for p in needs):
                with pytest.raises(jaxnorm.StatisticsMissingError):
                    hook(None, self.module, outputs, None, self.index)
                return
            hook(None, self.module, outputs, None, self.index)
        if reuse:  # the caller's input buffers, written as soon as the hook returned
            for t in given:
                t.fill_(1e4)
        want = clone(raw)
        theirs = self.anomalib.on_predict_batch_end if predict else self.anomalib.on_test_batch_end
        theirs(None, self.twin, want, None, self.index)
        bounds = {}
        for key, prefix, t in (
            ("pred_scores", IMAGE, IMAGE_T),
            ("anomaly_maps", PIXEL, PIXEL_T),
            ("box_scores", BOX, PIXEL_T),
        ):
            bounds[key] = bound(self.twin, prefix)
            if bounds[key] is None and key in raw:  # max == min in the states' dtype
                bounds[key] = 1e-6
                threshold = float(np.float32(stand_in.value(self.twin, t)))
                want[key] = (
                    [zero_range(b.double(), threshold) for b in raw[key]]
                    if key == "box_scores"
                    else zero_range(raw[key].double(), threshold)
                )
        assert_close(outputs, want, raw, bounds)

    @precondition(lambda self: self.ABANDON or self.phase != "validating")
    @rule(predict=st.booleans(), data=st.data())
    def test_round(self, predict, data):
        """``on_test_start`` (or ``on_predict_start``) and two batches, in one step."""
        self.start_test(predict)
        self.test_batch(data, reuse=True)
        self.test_batch(data, reuse=False)

    @precondition(lambda self: self.phase in ("testing", "predicting"))
    @rule(data=st.data())
    def write_between_batches(self, data):
        """Any tensor written by any method between two test (or predict) batches."""
        self.test_batch(data, reuse=False)
        self.write(
            data.draw(st.sampled_from([IMAGE_T, PIXEL_T, *STATS]), label="path"),
            data.draw(stat_values, label="value"),
            data.draw(st.sampled_from(tensor_writes.METHODS), label="method"),
        )
        self.test_batch(data, reuse=True)

    # -- mutations -----------------------------------------------------------------------------

    @rule(
        path=st.sampled_from([IMAGE_T, PIXEL_T, *STATS]),
        value=stat_values,
        method=st.sampled_from(tensor_writes.METHODS),
    )
    def write(self, path, value, method):
        """Any threshold or statistic of the module, by any method."""
        if path in STATS:
            if self.phase == "validating":
                return  # anomalib's metrics would fold it into the running statistics
            prefix, side = path.rsplit(".", 1)[0] + ".", path.rsplit(".", 1)[1]
            lo, hi = stand_in.pair(self.twin, prefix)
            if (lo, hi) == EMPTY:
                if self.ON_HOST is not None and method in UNKEYED:
                    # On an accelerator the checks (present, finite, ordered) are keyed: a
                    # write no key sees leaves "no statistics" standing (an error, not a wrong
                    # result; docs/differences.md). Values written so travel all the same.
                    method = "fill_"
                return self._write_pair(prefix, value, f32(value + 0.5), method)
            # keep max - min >= GAP: ours rejects max < min, anomalib divides by max - min
            value = tensor_writes.rounded(value, stand_in.tensor(self.twin, path).dtype)
            if (hi - value if side == "min" else value - lo) < GAP:
                return

        def apply(module):
            owner, name = tensor_writes.resolve(module, path)
            tensor_writes.write(owner, name, value, method)

        self.both(apply)

    def _write_pair(self, prefix, lo, hi, method):
        def apply(module):
            for side, value in (("min", lo), ("max", hi)):
                owner, name = tensor_writes.resolve(module, prefix + side)
                tensor_writes.write(owner, name, value, method)

        self.both(apply)

    @precondition(lambda self: self.phase != "validating")
    @rule(image_t=thresholds, lo=stat_values, span=spans, assign=st.booleans())
    def load_state_dict(self, image_t, lo, span, assign):
        """anomalib's ``load_state_dict`` (new threshold and metric instances, then torch's),
        or torch's with ``assign=True`` (anomalib's takes no ``assign``)."""
        values = {IMAGE_T: image_t, IMAGE + "min": lo, IMAGE + "max": f32(lo + span)}

        def apply(module):
            state = {
                k: v.clone() if isinstance(v, torch.Tensor) else v
                for k, v in module.state_dict().items()
            }
            for key, value in values.items():
                # After anomalib's load, its per-output metrics are also registered as
                # <output>_normalization_metrics (the same instances, loaded after).
                alias = key.replace("normalization_metrics.", "").replace(
                    ".", "_normalization_metrics.", 1
                )
                for k in (key, alias):
                    if k in state:
                        state[k] = torch.tensor(value, dtype=state[k].dtype)
            if assign:
                state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
                torch.nn.Module.load_state_dict(module, state, assign=True)
            else:
                module.load_state_dict(state)

        self.both(apply)

    @precondition(lambda self: self.phase != "validating")
    @rule(lo=stat_values, span=spans)
    def replace_metrics(self, lo, span):
        """New metric objects, as anomalib's ``load_state_dict`` puts there."""
        pairs = {p: (lo, f32(lo + span)) for p in PREFIXES}
        self.module.normalization_metrics = new_metrics(pairs)
        self.twin.normalization_metrics = new_metrics(pairs)

    @rule(how=st.sampled_from(["deepcopy", "pickle"]))
    def copy_module(self, how):
        def copied(module):
            return (
                copy.deepcopy(module) if how == "deepcopy" else pickle.loads(pickle.dumps(module))
            )

        self.module, self.twin = copied(self.module), copied(self.twin)
        if self.saved is not None:  # the twin's metrics put back at an abandon: its own copy
            self.saved = {p: t.clone() for p, t in self.saved.items()}

    @rule(how=st.sampled_from(["deepcopy", "pickle", "copy"]))
    def copy_callback(self, how):
        """Lightning's ddp_spawn pickles the trainer's callbacks; users copy them."""
        if how == "pickle":
            self.cb = pickle.loads(pickle.dumps(self.cb))
        else:
            self.cb = getattr(copy, how)(self.cb)

    @precondition(lambda self: self.phase in ("testing", "predicting"))
    @rule(how=st.sampled_from(["deepcopy", "pickle", "copy"]), data=st.data())
    def copy_callback_between_batches(self, how, data):
        """A copy made mid-test (after its steady path settled) goes on where it was."""
        self.test_batch(data, reuse=False)
        self.copy_callback(how)
        self.test_batch(data, reuse=False)

    @precondition(lambda self: self.phase != "validating")
    @rule(to=st.sampled_from(sorted(CONVERSIONS)))
    def convert_dtype(self, to):
        """``module.to(dtype)`` (Lightning's "16-true"/"bf16-true"/"64-true" precisions),
        which converts the metrics' states, and ``module.half()``, which torchmetrics stops."""
        self.both(CONVERSIONS[to])

    @precondition(lambda self: self.phase != "validating")
    @rule(stage=st.sampled_from(["fit", "validate", "test", "predict"]))
    def setup_again(self, stage):
        """What each ``engine.fit/validate/test/predict`` starts with."""
        self.cb.setup(None, self.module, stage)
        self.anomalib.setup(None, self.twin, stage)

    @invariant()
    def module_holds_the_twins_values(self):
        # The callback writes the statistics at validation epoch end only; mid-epoch
        # anomalib's metrics hold running ones.
        if self.module is not None:
            got, want = stand_in.values_of(self.module), stand_in.values_of(self.twin)
            if self.phase == "validating":
                got, want = ({k: v[k] for k in (IMAGE_T, PIXEL_T)} for v in (got, want))
            assert got == want or all(
                a == b or (math.isnan(a) and math.isnan(b))
                for a, b in zip(got.values(), want.values(), strict=True)
            ), (got, want)


class AgainstAnomalib(Anomalib1Machine):
    """Every mutation and phase, validation epochs always completed, on the CPU."""


class AbandonedEpochs(Anomalib1Machine):
    """Validation epochs may end without ``on_validation_epoch_end`` (driven by hand)."""

    ABANDON = True


class OnAnAccelerator(Anomalib1Machine):
    """The accelerator rule, stood in for on the CPU as in the main suite: values travel with
    every batch and only the checks are keyed, so writes that keep a tensor's identity,
    storage and version (``.data``, numpy and DLPack aliases) must still be seen."""

    ABANDON = True
    ON_HOST = staticmethod(lambda t: False)


for machine in (AgainstAnomalib, AbandonedEpochs, OnAnAccelerator):
    machine.TestCase.settings = machine_settings(max_examples=25)

TestAgainstAnomalib = AgainstAnomalib.TestCase
TestAbandonedEpochs = AbandonedEpochs.TestCase
TestOnAnAccelerator = OnAnAccelerator.TestCase
