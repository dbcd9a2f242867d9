"""A state machine for anomalib 0.x's callback, driven by hand (issue 20): shared by the main
suite (``tests/torch_compat/test_stateful_callback.py``: a numpy model of SPEC is the oracle) and
``tests_anomalib`` (anomalib 0.7's own callback, on a twin module, is the oracle).

``torch_compat.MinMaxNormalizationCallback`` runs on a module with anomalib 0.x's attributes
(``image_threshold.value``, ``pixel_threshold.value``, ``normalization_metrics``); the oracle
keeps a twin module to which every mutation is applied the same way. The machine interleaves
validation epochs (also abandoned ones), test and predict batches with every way the module's
values can change: any of its tensors written by any method of ``tests/tensor_writes.py``,
``load_state_dict`` (also ``assign=True``), new metric objects, ``deepcopy`` and pickle of the
module and of the callback, dtype conversion, ``setup`` again, and output buffers written right
after a hook returns. After every test or predict batch the outputs must be the oracle's, and
the module's values must be the twin's (the callback writes them at validation epoch end only).

The write rule picks any tensor of the module's state dict and any method: a cache keyed on
anything but the values would miss some combination, whichever class of stale cache it is.
"""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import jaxnorm
import torch_compat
from tests import reference, tensor_writes

IMAGE_T, PIXEL_T = "image_threshold.value", "pixel_threshold.value"
STATS = ("normalization_metrics.min", "normalization_metrics.max")
EMPTY = (math.inf, -math.inf)
KEYS = ("anomaly_maps", "pred_scores", "box_scores")
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPE_CONVERSIONS = {
    "half": lambda m: m.half(),
    "double": lambda m: m.double(),
    "float": lambda m: m.float(),
    "bfloat16": lambda m: m.to(torch.bfloat16),
}


class Threshold(torch.nn.Module):
    """anomalib's ``AnomalyScoreThreshold`` as far as the callbacks read it."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(value))


class Metrics:
    """anomalib's metric collections as far as the callbacks use them."""

    def set_threshold(self, value: float) -> None:
        self.threshold = value


class Module(torch.nn.Module):
    """The ``pl_module`` attributes anomalib 0.x's callback reads."""

    def __init__(self, image_t: float, pixel_t: float) -> None:
        super().__init__()
        self.image_threshold = Threshold(image_t)
        self.pixel_threshold = Threshold(pixel_t)
        self.image_metrics = Metrics()
        self.pixel_metrics = Metrics()


def values_of(module: torch.nn.Module) -> dict[str, float]:
    """The thresholds and statistics ``module`` holds now, as Python floats."""
    out = {}
    for path in (IMAGE_T, PIXEL_T, *STATS):
        owner, name = tensor_writes.resolve(module, path)
        out[path] = tensor_writes.as_float(getattr(owner, name))
    return out


def dtype_of(module, path: str) -> torch.dtype:
    owner, name = tensor_writes.resolve(module, path)
    return getattr(owner, name).dtype


def clone(outputs: dict) -> dict:
    return {
        k: [b.clone() for b in v] if isinstance(v, list) else v.clone() for k, v in outputs.items()
    }


def tensors_of(outputs: dict) -> list[torch.Tensor]:
    return [t for v in outputs.values() for t in (v if isinstance(v, list) else [v])]


@st.composite
def batches(draw, dtypes=(torch.float32,), layouts=("maps", "scores", "boxes", "all")):
    """One step's raw outputs with anomalib's keys; every validation batch with boxes as its
    statistics source has a box (anomalib's ``torch.cat`` of none fails)."""
    layout = draw(st.sampled_from(layouts))
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.sampled_from([2, 3, 4]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([0.25, 1.0, 3.0]))
    shift = draw(st.sampled_from([-1.0, 0.0, 2.0]))

    def values(*shape):
        return (torch.randn(shape, generator=g) * scale + shift).to(dtype)

    out = {"pred_scores": values(n), "label": torch.arange(n)}
    if layout in ("maps", "all"):
        out["anomaly_maps"] = values(n, 1, 4, 4)
    if layout in ("boxes", "all"):
        counts = [int(c) for c in torch.randint(0, 3, (n,), generator=g)]
        counts[0] = max(counts[0], 1)
        out["box_scores"] = [values(c) for c in counts]
    return out


thresholds = st.floats(-2.0, 3.0, width=32, allow_subnormal=False)
stat_values = st.floats(-3.0, 3.0, width=32, allow_subnormal=False)


class Oracle:
    """What the callback's outputs must be. It holds ``twin``, a module that every mutation
    reaches as it reaches the callback's module, and sees every batch the callback sees."""

    twin: torch.nn.Module

    def start_epoch(self, accumulate: bool) -> None:
        raise NotImplementedError

    def validation_batch(self, outputs: dict, index: int) -> None:
        raise NotImplementedError

    def end_epoch(self) -> None:
        raise NotImplementedError

    def abandon_epoch(self) -> None:
        """A validation epoch that started and will not end: its batches never count."""
        raise NotImplementedError

    def setup(self) -> None:
        pass

    def test_start(self) -> None:
        pass

    def expected(self, raw: dict, index: int) -> dict:
        """The normalized outputs of a test or predict batch (raw, cloned)."""
        raise NotImplementedError

    def replace_metrics(self, lo: float, hi: float) -> None:
        raise NotImplementedError


def assert_outputs(got: dict, want: dict, raw: dict) -> None:
    for key in ("pred_scores", "anomaly_maps", "box_scores"):
        if key not in raw:
            continue
        pairs = (
            zip(got[key], want[key], raw[key], strict=True)
            if key == "box_scores"
            else [(got[key], want[key], raw[key])]
        )
        for g, w, r in pairs:
            assert isinstance(g, torch.Tensor), key
            assert g.dtype == r.dtype and g.shape == r.shape, (key, g.dtype, g.shape)
            np.testing.assert_allclose(
                g.double().numpy(),
                np.asarray(w.double() if isinstance(w, torch.Tensor) else w, np.float64),
                atol=ATOL[r.dtype],
                rtol=0,
                err_msg=key,
            )


class CallbackMachine(RuleBasedStateMachine):
    """``torch_compat.MinMaxNormalizationCallback`` by hand against ``make_oracle()``'s."""

    # Whether validation epochs may be abandoned: started, some batches, then test or
    # predict or another epoch without ``on_validation_epoch_end`` (issue 20 class 5).
    ABANDON = False
    # Whether the callback is deep-copied and pickled (not only the module).
    COPY_CALLBACK = "deepcopy"
    # Whether dtype conversions reach normalization_metrics too (not only the thresholds).
    CONVERT_WHOLE_MODULE = False
    TEST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

    def make_oracle(self, image_t: float, pixel_t: float) -> Oracle:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self.module = None

    @initialize(
        accumulate=st.booleans(),
        image_t=thresholds,
        pixel_t=thresholds,
        loaded=st.one_of(st.none(), st.tuples(stat_values, st.floats(0.25, 3.0))),
    )
    def start(self, accumulate, image_t, pixel_t, loaded):
        """A fresh module and callback; ``loaded``: statistics already there (a checkpoint)."""
        self.accumulate = accumulate
        self.module = Module(image_t, pixel_t)
        self.cb = torch_compat.MinMaxNormalizationCallback(accumulate=accumulate)
        self.cb.setup(None, self.module, "fit")
        self.oracle = self.make_oracle(image_t, pixel_t)
        self.oracle.setup()
        self.phase = "idle"  # "validating", "testing" or "predicting"
        self.index = 0
        if loaded is not None:
            self.write_stats(loaded[0], loaded[1], "copy_")

    def both(self, fn) -> None:
        """Applies a mutation to the callback's module and to the oracle's twin alike."""
        fn(self.module)
        fn(self.oracle.twin)

    def _leave_epoch(self) -> None:
        if self.phase == "validating":
            self.oracle.abandon_epoch()

    # -- validation ----------------------------------------------------------------------------

    @precondition(lambda self: self.ABANDON or self.phase != "validating")
    @rule()
    def start_epoch(self):
        self._leave_epoch()
        self.cb.on_validation_epoch_start(None, self.module)
        self.oracle.start_epoch(self.accumulate)
        self.phase = "validating"

    @precondition(lambda self: self.phase == "validating")
    @rule(batch=batches(dtypes=(torch.float32, torch.float16)), reuse=st.booleans())
    def validation_batch(self, batch, reuse):
        self.index += 1
        self.oracle.validation_batch(clone(batch), self.index)
        self.cb.on_validation_batch_end(None, self.module, batch, None, self.index, 0)
        if reuse:  # the caller's buffers, written as soon as the hook returned
            for t in tensors_of(batch):
                t.fill_(1e4)

    @precondition(lambda self: self.phase == "validating")
    @rule()
    def end_epoch(self):
        self.cb.on_validation_epoch_end(None, self.module)
        self.oracle.end_epoch()
        self.phase = "idle"
        got, want = values_of(self.module), values_of(self.oracle.twin)
        assert [got[k] for k in STATS] == [want[k] for k in STATS]

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

    @precondition(lambda self: self.ABANDON or self.phase != "validating")
    @rule(predict=st.booleans())
    def start_test(self, predict):
        self._leave_epoch()
        if predict:
            self.cb.on_predict_start(None, self.module)
            self.phase = "predicting"
            return
        self.phase = "testing"
        self.oracle.test_start()
        if self.stats_empty():
            with pytest.raises(jaxnorm.StatisticsMissingError):
                self.cb.on_test_start(None, self.module)
        else:
            self.cb.on_test_start(None, self.module)
            assert self.module.image_metrics.threshold == 0.5

    def stats_empty(self) -> bool:
        values = values_of(self.oracle.twin)
        return (values[STATS[0]], values[STATS[1]]) == EMPTY

    @precondition(lambda self: self.phase in ("testing", "predicting"))
    @rule(batch=st.data(), reuse=st.booleans())
    def test_batch(self, batch, reuse):
        outputs = batch.draw(batches(dtypes=self.TEST_DTYPES))
        self.index += 1
        raw = clone(outputs)
        given = tensors_of(outputs)
        hook = (
            self.cb.on_predict_batch_end
            if self.phase == "predicting"
            else self.cb.on_test_batch_end
        )
        if self.stats_empty():
            with pytest.raises(jaxnorm.StatisticsMissingError):
                hook(None, self.module, outputs, None, self.index, 0)
            return
        hook(None, self.module, outputs, None, self.index, 0)
        if reuse:  # the caller's input buffers, written as soon as the hook returned
            for t in given:
                t.fill_(1e4)
        assert_outputs(outputs, self.oracle.expected(clone(raw), self.index), raw)

    @precondition(lambda self: self.ABANDON or self.phase != "validating")
    @rule(predict=st.booleans(), data=st.data())
    def test_round(self, predict, data):
        """``on_test_start`` (or ``on_predict_start``) and two batches, in one step."""
        self.start_test(predict)
        self.test_batch(data, reuse=True)
        self.test_batch(data, reuse=False)

    @precondition(lambda self: self.phase in ("testing", "predicting"))
    @rule(
        path=st.sampled_from([IMAGE_T, PIXEL_T, *STATS]),
        value=stat_values,
        method=st.sampled_from(tensor_writes.METHODS),
        data=st.data(),
    )
    def write_between_batches(self, path, value, method, data):
        """Any tensor written by any method between two test (or predict) batches."""
        self.test_batch(data, reuse=False)
        self.write(path, value, method)
        self.test_batch(data, reuse=True)

    # -- mutations -----------------------------------------------------------------------------

    @rule(
        path=st.sampled_from([IMAGE_T, PIXEL_T, *STATS]),
        value=stat_values,
        method=st.sampled_from(tensor_writes.METHODS),
    )
    def write(self, path, value, method):
        """Any tensor of the module, by any method."""
        if path in STATS:
            if self.phase == "validating":
                return  # the epoch's end overwrites them (see the oracles)
            lo, hi = (values_of(self.oracle.twin)[k] for k in STATS)
            if (lo, hi) == EMPTY:
                return self.write_stats(value, abs(value) + 0.5, method)
            # keep min < max: the callback rejects others, anomalib would divide by them
            dtype = dtype_of(self.module, path)
            value = tensor_writes.rounded(value, dtype)
            if (path == STATS[0] and value >= hi) or (path == STATS[1] and value <= lo):
                return
        owner_path = path

        def apply(module):
            owner, name = tensor_writes.resolve(module, owner_path)
            tensor_writes.write(owner, name, value, method)

        self.both(apply)

    @precondition(lambda self: self.phase != "validating")
    @rule(lo=stat_values, span=st.floats(0.25, 3.0), method=st.sampled_from(tensor_writes.METHODS))
    def write_stats(self, lo, span, method):
        hi = lo + span

        def apply(module):
            for path, value in zip(STATS, (lo, hi), strict=True):
                owner, name = tensor_writes.resolve(module, path)
                tensor_writes.write(owner, name, value, method)

        self.both(apply)

    @precondition(lambda self: self.phase != "validating")
    @rule(
        image_t=thresholds,
        lo=stat_values,
        span=st.floats(0.25, 3.0),
        assign=st.booleans(),
    )
    def load_state_dict(self, image_t, lo, span, assign):
        values = {IMAGE_T: image_t, STATS[0]: lo, STATS[1]: lo + span}

        def apply(module):
            state = {k: v.clone() for k, v in module.state_dict().items()}
            for key, value in values.items():
                state[key] = torch.tensor(value, dtype=state[key].dtype)
            module.load_state_dict(state, assign=assign)

        self.both(apply)

    @precondition(lambda self: self.phase != "validating")
    @rule(lo=stat_values, span=st.floats(0.25, 3.0))
    def replace_metrics(self, lo, span):
        """A new ``normalization_metrics`` object (what anomalib 0.7's load_state_dict puts)."""
        metrics = torch_compat.MinMax()
        metrics.min.fill_(lo)
        metrics.max.fill_(lo + span)
        self.module.normalization_metrics = metrics
        self.oracle.replace_metrics(lo, lo + span)

    @rule(how=st.sampled_from(["deepcopy", "pickle"]))
    def copy_module(self, how):
        def copied(module):
            if how == "deepcopy":
                return copy.deepcopy(module)
            return pickle.loads(pickle.dumps(module))

        self.module = copied(self.module)
        self.oracle.twin = copied(self.oracle.twin)

    @precondition(lambda self: self.COPY_CALLBACK)
    @rule()
    def copy_callback(self):
        if self.COPY_CALLBACK == "pickle":
            self.cb = pickle.loads(pickle.dumps(self.cb))
        else:
            self.cb = copy.deepcopy(self.cb)

    @precondition(lambda self: self.COPY_CALLBACK and self.phase in ("testing", "predicting"))
    @rule(data=st.data())
    def copy_callback_between_batches(self, data):
        """A copy made mid-test (after its steady path settled) goes on where it was."""
        self.test_batch(data, reuse=False)
        self.copy_callback()
        self.test_batch(data, reuse=False)

    @precondition(lambda self: not (self.CONVERT_WHOLE_MODULE and self.phase == "validating"))
    @rule(to=st.sampled_from(sorted(DTYPE_CONVERSIONS)))
    def convert_dtype(self, to):
        """``module.half()`` and the like (Lightning's "16-true"/"bf16-true" precisions);
        only the thresholds' modules unless ``CONVERT_WHOLE_MODULE``.

        The whole module is converted between validation epochs only: anomalib's metric
        updates its states at each batch, so a conversion in mid-epoch rounds the running
        statistics it holds, while the callback's live in the hook until the epoch ends
        (docs/differences.md)."""
        convert = DTYPE_CONVERSIONS[to]

        def apply(module):
            if self.CONVERT_WHOLE_MODULE:
                convert(module)
            else:
                convert(module.image_threshold)
                convert(module.pixel_threshold)

        self.both(apply)

    @precondition(lambda self: self.phase != "validating")
    @rule(stage=st.sampled_from(["fit", "validate", "test", "predict"]))
    def setup_again(self, stage):
        """What each ``trainer.fit/validate/test/predict`` starts with."""
        self.cb.setup(None, self.module, stage)
        self.oracle.setup()

    @invariant()
    def module_holds_the_twins_values(self):
        # The callback writes the statistics at validation epoch end only; mid-epoch an
        # oracle may hold running ones (anomalib's metric updates at each batch).
        if self.module is not None:
            got, want = values_of(self.module), values_of(self.oracle.twin)
            if self.phase == "validating":
                got, want = ({k: v[k] for k in (IMAGE_T, PIXEL_T)} for v in (got, want))
            assert got == want


class AcceleratorStandIn:
    """Mixin: while the machine runs, ``torch.Tensor.is_cpu`` is False for every tensor, so
    the callback treats the module's tensors as on an accelerator, where reading a value
    waits for the device and caches key on something else (identity, storage, version).
    The values stay on the CPU, where the oracle reads them."""

    def __init__(self) -> None:
        super().__init__()
        if "is_cpu" not in torch.Tensor.__dict__:
            torch.Tensor.is_cpu = property(lambda self: False)

    def teardown(self) -> None:
        if "is_cpu" in torch.Tensor.__dict__:
            del torch.Tensor.is_cpu  # the inherited C property again
        super().teardown()


def machine_settings(*, max_examples: int, failing: bool = False) -> settings:
    """Derandomized and bounded; an expected failure (``xfail``) is not shrunk (time)."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(
        max_examples=max_examples,
        stateful_step_count=40,
        deadline=None,
        derandomize=True,
        phases=phases if failing else [*phases, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def machine_test_cases(
    base: type[CallbackMachine], max_examples: int, converted_differs: str | None = None
) -> tuple[type, ...]:
    """The test cases of ``base`` and of its variants, settings and marks set:
    ``(base, abandoned epochs, on an accelerator, converted module)``; the last one a strict
    expected failure when ``converted_differs`` names a documented difference."""

    class AbandonedEpochs(base):
        ABANDON = True

    class OnAnAccelerator(AcceleratorStandIn, base):
        pass

    class ConvertedModule(base):
        CONVERT_WHOLE_MODULE = True

    base.TestCase.settings = machine_settings(max_examples=max_examples)
    cases = [base.TestCase]
    for machine in (AbandonedEpochs, OnAnAccelerator, ConvertedModule):
        machine.__name__ = machine.__qualname__ = f"{base.__name__}{machine.__name__}"
        failing = machine is ConvertedModule and converted_differs is not None
        machine.TestCase.settings = machine_settings(max_examples=60, failing=failing)
        case = machine.TestCase
        cases.append(
            pytest.mark.xfail(strict=True, reason=converted_differs)(case) if failing else case
        )
    return tuple(cases)


# -- the oracle of the main suite: SPEC in numpy ---------------------------------------------


class NumpyOracle(Oracle):
    """SPEC sections 1 and 2 in numpy: test and predict use the thresholds and statistics
    ``normalization_metrics`` holds (the last completed validation epoch's, or whatever was
    written or loaded since), each epoch's are written at its end."""

    def __init__(self, image_t: float, pixel_t: float) -> None:
        self.twin = Module(image_t, pixel_t)
        self.twin.normalization_metrics = torch_compat.MinMax()
        self.epoch = None

    def start_epoch(self, accumulate: bool) -> None:
        values = values_of(self.twin)
        self.epoch = (values[STATS[0]], values[STATS[1]]) if accumulate else EMPTY

    def validation_batch(self, outputs: dict, index: int) -> None:
        source = reference.stats_source(
            {
                k: [b.double() for b in v] if k == "box_scores" else v.double()
                for k, v in outputs.items()
                if k in KEYS
            }
        )
        if source.size:
            lo, hi = float(np.float32(source.min())), float(np.float32(source.max()))
            self.epoch = (min(self.epoch[0], lo), max(self.epoch[1], hi))

    def end_epoch(self) -> None:
        # Collected statistics are float32 (SPEC), whatever dtype the metric's states were
        # converted to: anomalib 0.7's metric states become float32 at their first update
        # (torch's type promotion of the state with the float32 batch minimum). An epoch that
        # folded nothing updated nothing: the empty pair is written in place, dtype kept.
        collected = self.epoch[0] <= self.epoch[1]
        for path, value in zip(STATS, self.epoch, strict=True):
            owner, name = tensor_writes.resolve(self.twin, path)
            if collected:
                setattr(owner, name, torch.tensor(value, dtype=torch.float32))
            else:
                getattr(owner, name).fill_(value)
        self.epoch = None

    def abandon_epoch(self) -> None:
        self.epoch = None

    def expected(self, raw: dict, index: int) -> dict:
        values = values_of(self.twin)
        lo, hi = values[STATS[0]], values[STATS[1]]
        thresholds = {"image": values[IMAGE_T], "pixel": values[PIXEL_T]}
        out = {}
        for key in ("pred_scores", "anomaly_maps", "box_scores"):
            if key not in raw:
                continue
            t = thresholds["image" if key == "pred_scores" else "pixel"]
            if key == "box_scores":
                out[key] = [reference.normalize(b.double().numpy(), t, lo, hi) for b in raw[key]]
            else:
                out[key] = reference.normalize(raw[key].double().numpy(), t, lo, hi)
        return out

    def replace_metrics(self, lo: float, hi: float) -> None:
        metrics = torch_compat.MinMax()
        metrics.min.fill_(lo)
        metrics.max.fill_(hi)
        self.twin.normalization_metrics = metrics
