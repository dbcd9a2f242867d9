"""``torch_compat.anomalib2.PostProcessor`` against anomalib 2.7's own ``PostProcessor``, in a
hypothesis state machine (issue 20).

Twin instances get the same batches and the same mutations: validation batches and epoch
ends, test, predict and ``forward`` batches, and between them any buffer written by any method
of ``tests/tensor_writes.py`` (in place, through ``.data``, numpy or DLPack aliases, ``.data =``,
a new tensor), sensitivities replaced or written in place (a tensor, a numpy 0-d array),
``load_state_dict`` (also ``assign=True``), ``deepcopy`` and the multiprocessing pickle, and
dtype conversions (``.half()``, ``.to(torch.bfloat16)``...). Every output and every buffer must
equal anomalib's bit for bit (the documented differences, NaN validation scores and unusable
buffers, are never generated). Derandomized and bounded.

Each family of mutations that today's code gets wrong has its own machine, marked with the
class of issue 20 it stands for; ``TestAnyMutation`` draws from all of them at once.
"""

from __future__ import annotations

import copy
import math
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
from anomalib.data import ImageBatch, InferenceBatch
from anomalib.post_processing import PostProcessor as AnomalibPostProcessor
from common import BUFFERS, FIELDS
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests import tensor_writes
from tests.callback_machine import machine_settings
from torch_compat.anomalib2 import PostProcessor

PAIRS = (("image_min", "image_max"), ("pixel_min", "pixel_max"))
THRESHOLDS = ("_image_threshold", "_pixel_threshold")
# Writes that bump the tensor's version counter or replace it, and those that do not.
COUNTED = ("fill_", "copy_", "index", "zero_().add_", "inference_mode", "assign new tensor")
UNCOUNTED = ("data.fill_", "numpy alias", "dlpack alias", ".data = new tensor")
CONVERSIONS = {
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.to(torch.bfloat16),
    "double": lambda m: m.double(),
    "float": lambda m: m.float(),
}

values = st.floats(-4.0, 4.0, width=32, allow_subnormal=False)


def same(a, b, what, exact: bool = True) -> None:
    """Bit for bit, NaN where NaN; with ``exact=False`` (float64 buffers: jaxnorm computes
    their midpoint and range in float32, docs/anomalib2.md) floats within float32 rounding
    of the range, and labels and masks still bit for bit."""
    assert type(a) is type(b), (what, type(a), type(b))
    if a is None:
        return
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape)
    assert torch.equal(a.isnan(), b.isnan()), (what, a, b)
    if exact or not a.is_floating_point():
        assert torch.equal(a[~a.isnan()], b[~b.isnan()]), (what, a, b)
    else:
        torch.testing.assert_close(a[~a.isnan()], b[~b.isnan()], rtol=0, atol=4e-6, msg=what)


@st.composite
def fields(draw, labels=True):
    n = draw(st.sampled_from([2, 3, 4]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([0.5, 1.0, 3.0]))
    shift = draw(st.sampled_from([-1.0, 0.0, 1.5]))
    out = {
        "image": torch.rand(n, 3, 8, 8, generator=g),
        "pred_score": torch.randn(n, generator=g) * scale + shift,
        "anomaly_map": torch.randn(n, 8, 8, generator=g) * scale + shift,
    }
    if labels:
        out["gt_label"] = torch.tensor([i % 2 for i in range(n)])
        out["gt_mask"] = torch.rand(n, 8, 8, generator=g) > 0.8
    return out


def image_batch(f: dict) -> ImageBatch:
    return ImageBatch(**{k: v.clone() for k, v in f.items()})


class PostProcessorMachine(RuleBasedStateMachine):
    """The twins and what may happen to them."""

    METHODS = COUNTED  # how buffers are written
    COPIES = False  # deepcopy and the multiprocessing pickle (issue 20 class 2)
    SENSITIVITY_WRITES = False  # sensitivities written in place (class 3)
    CONVERT = False  # dtype conversions of the module (class 4)

    def __init__(self) -> None:
        super().__init__()
        self.ours = None

    @initialize(
        matching=st.booleans(),
        image_sensitivity=st.sampled_from([0.5, 0.3, 0.8]),
        pixel_sensitivity=st.sampled_from([0.5, 0.2]),
        validated=st.lists(fields(), max_size=2),
    )
    def start(self, matching, image_sensitivity, pixel_sensitivity, validated):
        """Twins, validated on ``validated`` when there are any (a fitted model)."""
        kwargs = dict(
            enable_threshold_matching=matching,
            image_sensitivity=image_sensitivity,
            pixel_sensitivity=pixel_sensitivity,
        )
        self.ours, self.theirs = PostProcessor(**kwargs), AnomalibPostProcessor(**kwargs)
        self.pending = False  # validation batches folded since the last epoch end
        if validated:
            self.validation_epoch(validated)

    def exact(self) -> bool:
        """Whether outputs must be anomalib's bit for bit: unless the buffers are float64."""
        return self.theirs.image_min.dtype != torch.float64

    def both(self, fn) -> None:
        fn(self.ours)
        fn(self.theirs)

    # -- validation ----------------------------------------------------------------------------

    @rule(f=fields(), reuse=st.booleans())
    def validation_batch(self, f, reuse):
        ours, theirs = image_batch(f), image_batch(f)
        self.theirs.on_validation_batch_end(None, None, theirs)
        self.ours.on_validation_batch_end(None, None, ours)
        self.pending = True
        if reuse:
            # The model's output buffers, written as soon as our hook returned: everything
            # was taken at the hook (min/max and F1 states folded in its dispatch). anomalib's
            # F1AdaptiveThreshold keeps the tensors it was handed until the epoch ends, so the
            # same write would change its thresholds (docs/anomalib2.md): its batch is left
            # as the model gave it, the values both were handed.
            ours.pred_score.fill_(1e4)
            ours.anomaly_map.fill_(-1e4)

    @rule()
    def validation_epoch_end(self):
        self.both(lambda pp: pp.on_validation_epoch_end(None, None))
        self.pending = False
        for name in BUFFERS:
            same(getattr(self.ours, name), getattr(self.theirs, name), name)

    @rule(batches=st.lists(fields(), min_size=1, max_size=3))
    def validation_epoch(self, batches):
        for f in batches:
            self.validation_batch(f, reuse=True)
        self.validation_epoch_end()

    # -- test, predict and forward -------------------------------------------------------------

    @rule(f=fields(labels=False), how=st.sampled_from(["test", "predict"]))
    def test_batch(self, f, how):
        ours, theirs = image_batch(f), image_batch(f)
        hook = "on_test_batch_end" if how == "test" else "on_predict_batch_end"
        getattr(self.theirs, hook)(None, None, theirs)
        getattr(self.ours, hook)(None, None, ours)
        for field in FIELDS:
            same(getattr(ours, field), getattr(theirs, field), (how, field), self.exact())

    @rule(
        f=fields(labels=False),
        dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
        score=st.booleans(),
    )
    def forward(self, f, dtype, score):
        batch = InferenceBatch(
            pred_score=f["pred_score"].to(dtype) if score else None,
            anomaly_map=f["anomaly_map"].to(dtype),
        )
        got, want = self.ours(batch), self.theirs(batch)
        for field in FIELDS:
            same(getattr(got, field), getattr(want, field), ("forward", dtype, field), self.exact())

    @rule(f=fields(labels=False), data=st.data())
    def mutate_between_batches(self, f, data):
        """Two test batches with one mutation between them, of any kind this machine has."""
        self.test_batch(f, "test")
        data.draw(st.sampled_from(self.mutations()))(self, data)
        self.test_batch(f, "predict")

    @rule(f=fields(labels=False), data=st.data())
    def write_between_batches(self, f, data):
        """Any buffer written by any of this machine's methods between two batches."""
        self.test_batch(f, "test")
        self._write(data)
        self.forward(f, torch.float32, score=True)

    @precondition(lambda self: self.SENSITIVITY_WRITES)
    @rule(f=fields(labels=False), data=st.data())
    def sensitivity_between_batches(self, f, data):
        """A sensitivity of any kind, then written by any means, between two batches."""
        self._sensitivity(data)
        self.test_batch(f, "test")
        self._sensitivity(data)
        self.test_batch(f, "predict")

    @precondition(lambda self: self.CONVERT)
    @rule(f=fields(labels=False), data=st.data())
    def convert_between_batches(self, f, data):
        """A dtype conversion between two batches (Lightning's "16-true" and the like)."""
        self.test_batch(f, "test")
        self._convert(data)
        self.test_batch(f, "predict")
        self.forward(f, torch.float16, score=False)

    @precondition(lambda self: self.COPIES)
    @rule(
        f=fields(labels=False),
        batches=st.lists(fields(), min_size=1, max_size=2),
        data=st.data(),
    )
    def copy_and_go_on(self, f, batches, data):
        """A copy made after test batches validates again and tests: it must use its own
        statistics from then on, whatever it remembered of the original's."""
        self.test_batch(f, "test")
        self._copy(data)
        self.validation_epoch(batches)
        self.test_batch(f, "predict")

    # -- mutations -----------------------------------------------------------------------------

    def mutations(self):
        out = [PostProcessorMachine._write, PostProcessorMachine._load]
        if self.COPIES:
            out.append(PostProcessorMachine._copy)
        if self.SENSITIVITY_WRITES:
            out.append(PostProcessorMachine._sensitivity)
        if self.CONVERT:
            out.append(PostProcessorMachine._convert)
        return out

    def _write(self, data):
        name = data.draw(st.sampled_from(BUFFERS), label="buffer")
        method = data.draw(st.sampled_from(self.METHODS), label="method")
        value = data.draw(st.one_of(values, st.just(math.nan)), label="value")
        value = self._usable(name, tensor_writes.rounded(value, getattr(self.ours, name).dtype))
        if value is None:
            return

        def apply(pp):
            tensor_writes.write(pp, name, value, method)

        self.both(apply)

    def _usable(self, name: str, value: float) -> float | None:
        """``value`` when the buffers stay usable (``max >= min`` where both are set), else
        ``None``: ours rejects the others, anomalib uses them (a documented difference)."""
        for lo, hi in PAIRS:
            if name in (lo, hi) and not math.isnan(value):
                other = getattr(self.theirs, hi if name == lo else lo).item()
                if not math.isnan(other) and ((name == lo) != (value <= other)):
                    return None
        return value

    def _load(self, data):
        assign = data.draw(st.booleans(), label="assign")
        lo = data.draw(values, label="min")
        span = data.draw(st.floats(0.0, 4.0), label="span")
        t = data.draw(st.one_of(values, st.just(math.nan)), label="threshold")
        state = {k: v.clone() for k, v in self.theirs.state_dict().items()}
        for lo_name, hi_name in PAIRS:
            state[lo_name] = torch.tensor(lo, dtype=state[lo_name].dtype)
            state[hi_name] = torch.tensor(lo + span, dtype=state[hi_name].dtype)
        state["_image_threshold"] = torch.tensor(t, dtype=state["_image_threshold"].dtype)
        self.both(
            lambda pp: pp.load_state_dict({k: v.clone() for k, v in state.items()}, assign=assign)
        )

    def _copy(self, data):
        # ddp_spawn pickles the model before an epoch, never in the middle of one (a spawned
        # copy starts with no folded batches; anomalib's pickles its metrics' states).
        kinds = ["deepcopy"] if self.pending else ["deepcopy", "spawn"]
        how = data.draw(st.sampled_from(kinds), label="copy")
        if how == "deepcopy":
            self.ours, self.theirs = copy.deepcopy(self.ours), copy.deepcopy(self.theirs)
        else:  # Lightning's ddp_spawn pickles the model for its workers
            self.ours = pickle.loads(ForkingPickler.dumps(self.ours))
            self.theirs = pickle.loads(ForkingPickler.dumps(self.theirs))

    def _sensitivity(self, data):
        which = data.draw(st.sampled_from(["image_sensitivity", "pixel_sensitivity"]))
        value = data.draw(st.sampled_from([0.05, 0.3, 0.5, 0.7, 0.95]), label="sensitivity")
        how = data.draw(st.sampled_from(["float", "tensor", "numpy", "in place"]), label="how")
        for pp in (self.ours, self.theirs):
            current = getattr(pp, which)
            if how == "float":
                setattr(pp, which, value)
            elif how == "tensor":
                setattr(pp, which, torch.tensor(value))
            elif how == "numpy":
                setattr(pp, which, np.array(value))
            elif isinstance(current, torch.Tensor):
                current.fill_(value)
            elif isinstance(current, np.ndarray):
                current[...] = value
            else:
                setattr(pp, which, value)

    def _convert(self, data):
        to = data.draw(st.sampled_from(sorted(CONVERSIONS)), label="dtype")
        self.both(CONVERSIONS[to])

    @rule(data=st.data())
    def mutate(self, data):
        data.draw(st.sampled_from(self.mutations()))(self, data)

    @invariant()
    def buffers_are_the_twins(self):
        if self.ours is not None:
            for name in BUFFERS:
                same(getattr(self.ours, name), getattr(self.theirs, name), name)


class CountedWrites(PostProcessorMachine):
    """Writes that bump a version counter or replace the tensor, and load_state_dict."""


class UncountedWrites(PostProcessorMachine):
    METHODS = COUNTED + UNCOUNTED


class Copies(PostProcessorMachine):
    COPIES = True


class Sensitivities(PostProcessorMachine):
    SENSITIVITY_WRITES = True


class HalfPrecision(PostProcessorMachine):
    CONVERT = True


class AnyMutation(PostProcessorMachine):
    """Every family at once: what would catch the next class of stale cache."""

    METHODS = COUNTED + UNCOUNTED
    COPIES = SENSITIVITY_WRITES = CONVERT = True


for machine in (CountedWrites, UncountedWrites, Copies, Sensitivities, HalfPrecision, AnyMutation):
    machine.TestCase.settings = machine_settings(max_examples=40)

TestCountedWrites = CountedWrites.TestCase
TestUncountedWrites = UncountedWrites.TestCase
TestCopies = Copies.TestCase
TestSensitivities = Sensitivities.TestCase
TestHalfPrecision = HalfPrecision.TestCase
TestAnyMutation = AnyMutation.TestCase
