"""jaxnorm.F1AdaptiveThreshold: streaming, merging, devices, jit, and the bounded mode."""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
from jaxnorm._src import f1_curve
from jaxnorm.testing import count_compiles
from tests import compat, slow_producer
from tests import f1_reference as ref

F1 = jaxnorm.F1AdaptiveThreshold


def make_batches(seed, n_batches=4, shape=(4, 1, 16, 16), shift=2.0, rate=0.08):
    """Anomaly maps and masks: anomalous pixels score ``shift`` higher on average."""
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        mask = r.random(shape) < rate
        maps = (r.normal(size=shape) + shift * mask).astype(np.float32)
        out.append((maps, mask))
    return out


def flat(batches):
    return (
        np.concatenate([np.ravel(s) for s, _ in batches]),
        np.concatenate([np.ravel(m) for _, m in batches]),
    )


def fold(batches, state):
    for scores, labels in batches:
        state = state.update(scores, labels)
    return state


def bits(x):
    return np.float32(np.asarray(x)).view(np.uint32)


def test_exact_equals_reference_over_all_batches_in_any_order():
    batches = make_batches(0)
    want = ref.f1_threshold(*flat(batches))
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        result = fold([batches[i] for i in order], F1.empty()).compute_with_bound()
        assert bits(result.threshold) == bits(want)
        assert float(result.max_f1_lost) == 0.0
        thresholds, f1 = ref.f1_curve(*flat(batches))
        assert float(result.f1) == f1[np.flatnonzero(thresholds == want)[0]]


def test_exact_past_the_sort_size_takes_the_bins_and_equals_reference():
    batches = make_batches(1, n_batches=3, shape=(12, 1, 32, 32))
    assert sum(s.size for s, _ in batches) > f1_curve.SORT_BELOW
    assert bits(fold(batches, F1.empty()).compute()) == bits(ref.f1_threshold(*flat(batches)))


def test_exact_keeps_no_more_than_anomalib_and_never_aliases_the_input():
    """anomalib keeps every score and target: so do we (a one-byte code per target)."""
    x = jnp.asarray(make_batches(2)[0][0])
    labels = jnp.asarray(make_batches(2)[0][1])
    state = F1.empty().update(x, labels)
    ((stored, code),) = state.chunks
    assert stored.nbytes + code.nbytes == x.nbytes + labels.nbytes
    assert stored.unsafe_buffer_pointer() != x.unsafe_buffer_pointer()
    half = F1.empty().update(x.astype(jnp.float16), labels)
    assert half.chunks[0][0].dtype == jnp.float16  # 16-bit scores stay 16-bit


def test_mixed_dtypes_shapes_and_label_kinds():
    r = np.random.default_rng(3)
    parts = [
        (r.normal(size=(3, 5)).astype(np.float16), r.random((3, 5)) < 0.3),
        (r.normal(size=(7,)).astype(np.float32), r.integers(0, 3, 7)),
        (
            r.normal(size=(2, 1, 4)).astype(jnp.bfloat16),
            (r.random((2, 4)) < 0.5).astype(np.float32),
        ),
    ]
    state = fold(parts, F1.empty())
    scores = np.concatenate([np.asarray(s, np.float32).ravel() for s, _ in parts])
    labels = np.concatenate([np.ravel(lab).astype(np.int64) for _, lab in parts])
    assert bits(state.compute()) == bits(ref.f1_threshold(scores, labels))


def test_merge_equals_one_state_that_saw_everything():
    batches = make_batches(4)
    a, b = fold(batches[:2], F1.empty()), fold(batches[2:], F1.empty())
    want = bits(ref.f1_threshold(*flat(batches)))
    assert bits(a.merge(b).compute()) == bits(b.merge(a).compute()) == want
    assert bits(F1.empty().merge(a.merge(b)).compute()) == want
    with pytest.raises(ValueError, match="same F1AdaptiveThreshold.empty"):
        a.merge(F1.empty("bounded"))
    with pytest.raises(TypeError, match="expected an F1AdaptiveThreshold"):
        a.merge(jaxnorm.MinMax.empty())


def test_one_class_and_empty_states():
    r = np.random.default_rng(5)
    x = r.normal(size=50).astype(np.float32)
    assert float(F1.empty().update(x, np.zeros(50, bool)).compute()) == x.max()
    assert float(F1.empty().update(x, np.ones(50, bool)).compute()) == x.min()
    bounded = F1.empty("bounded")
    assert float(bounded.update(x, np.where(x > 1, 255, 0)).compute()) == x.max()
    assert float(bounded.update(x, np.ones(50, bool)).compute()) == x.min()
    for mode in ("exact", "bounded"):
        with pytest.raises(ValueError, match="no score to choose"):
            F1.empty(mode).compute()


@pytest.mark.parametrize("mode", ["exact", "bounded"])
def test_nonfinite_raise_at_compute_with_the_count_or_omit(mode):
    x, y = make_batches(6)[0]
    bad = x.copy()
    bad.flat[[0, 7]] = [np.nan, -np.inf]
    state = F1.empty(mode).update(x, y).update(bad, y)
    assert state.num_nonfinite == 2
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="2 non-finite") as e:
        state.compute()
    assert e.value.count == 2
    omit = F1.empty(mode, nonfinite="omit").update(x, y).update(bad, y)
    keep = np.isfinite(bad.ravel())
    scores = np.concatenate([x.ravel(), bad.ravel()[keep]])
    labels = np.concatenate([y.ravel(), y.ravel()[keep]])
    assert bits(omit.compute()) == bits(ref.f1_threshold(scores, labels))


def test_masked_entries_are_left_out():
    x, y = make_batches(7)[0]
    mask = np.random.default_rng(7).random(x.shape) < 0.6
    poisoned = np.where(mask, x, np.float32(1e30))
    for mode in ("exact", "bounded"):
        got = F1.empty(mode).update(poisoned, y, mask).compute()
        assert bits(got) == bits(ref.f1_threshold(x[mask], y[mask]))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode='fast'"):
        F1.empty("fast")
    with pytest.raises(ValueError, match="slots=0"):
        F1.empty("bounded", slots=0)
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        F1.empty(nonfinite="skip")
    with pytest.raises(ValueError, match="labels have shape"):
        F1.empty().update(np.zeros(3, np.float32), np.zeros(4, bool))
    with pytest.raises(ValueError, match="cannot be carried through jit"):
        jax.jit(lambda s, x, y: s.update(x, y))(F1.empty(), np.zeros(3, np.float32), np.ones(3))


# --- one dispatch per batch, no recompiles, no host reads ---------------------------------


@pytest.mark.parametrize("mode", ["exact", "bounded"])
@pytest.mark.parametrize("size", ["sort", "bins"])
def test_a_second_epoch_compiles_nothing(mode, size, monkeypatch):
    """Updates compile once per batch shape, and compute once per size class, whatever the
    number of batches: powers of two for the sort of small sets, and for the bins the group
    sizes of candidate bins (two classes), which the data decides."""
    if size == "bins":
        monkeypatch.setattr(f1_curve, "SORT_BELOW", 0)
    batches = make_batches(8, n_batches=6)
    fold(batches[:5], F1.empty(mode)).compute()
    with count_compiles() as log:
        fold(batches[:5], F1.empty(mode)).compute()  # the same epoch again
    assert log.count == 0, log.names
    with count_compiles() as log:
        fold(batches[1:6], F1.empty(mode)).compute()  # other values
        fold(batches[:6], F1.empty(mode)).compute()  # one batch more, same size class
    # jax < 0.7 names no compiled function ("?")
    assert set(log.names) <= {"jit(_fine_add)", "jit(sweep)", "?"}, log.names
    assert log.count <= 2, log.names


def test_bounded_update_is_pure_and_jittable_without_recompiles():
    step = jax.jit(lambda s, x, y: s.update(x, y))
    batches = make_batches(9)
    state = step(F1.empty("bounded"), *batches[0])
    with count_compiles() as log:
        state = fold_with(step, batches[1:], state)
    assert log.count == 0, log.names
    assert bits(state.compute()) == bits(ref.f1_threshold(*flat(batches)))


def test_exact_fold_batch_runs_in_a_jitted_step_that_carries_the_state():
    """What a hook does: fold inside its own jitted step, keep the chunk outside."""

    @jax.jit
    def step(state, x, y):
        return state.fold_batch(x, y)

    batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in make_batches(19)]
    state, chunk = step(F1.empty(), *batches[0])
    chunks = [chunk]
    with count_compiles() as log:
        for x, y in batches[1:]:
            state, chunk = step(state, x, y)
            chunks.append(chunk)
    assert log.count == 0, log.names
    assert state.chunks == ()
    state = state.replace(chunks=tuple(chunks))
    assert bits(state.compute()) == bits(ref.f1_threshold(*flat(make_batches(19))))


def fold_with(step, batches, state):
    for x, y in batches:
        state = step(state, x, y)
    return state


def test_update_returns_before_a_slow_producer_finishes():
    """No host read per batch: update only enqueues work on the producer's output."""

    def fn(seed, flag, steps):
        x = jax.random.normal(jax.random.PRNGKey(seed), (512, 512))
        x = jax.lax.fori_loop(0, steps, lambda i, v: jnp.sin(v) + 0.5 * v, x)
        return x, x > 0.5

    produce = slow_producer.calibrated(fn)
    for mode in ("exact", "bounded"):
        state = F1.empty(mode).update(*produce(0))  # compiled
        jax.block_until_ready(state.counts)
        x, y = produce(1)
        state = state.update(x, y)
        assert not x.is_ready(), f"{mode}: update waited for its inputs"
        jax.block_until_ready(state.counts)


# --- the bounded mode ---------------------------------------------------------------------


def test_bounded_is_exact_on_stationary_data():
    """The first batch ranks the bins near the optimum: every candidate gets a slot."""
    for seed in range(4):
        batches = make_batches(100 + seed, n_batches=4, shape=(16, 1, 64, 64))
        state = F1.empty("bounded", buffer=0)  # no small-set buffer: the slots decide
        result = fold(batches, state).compute_with_bound()
        assert float(result.max_f1_lost) == 0
        assert bits(result.threshold) == bits(ref.f1_threshold(*flat(batches)))


def test_bounded_buffer_overflow_replays_into_complete_slots():
    """While the buffer holds every score no slot is given; the batch that overflows it
    gives them out and replays the buffer, so they are complete; so does a merge of two
    whole buffers that do not fit together."""
    batches = make_batches(18, n_batches=4, shape=(4, 1, 16, 16))  # 1024 values a batch
    want = bits(ref.f1_threshold(*flat(batches)))
    state = F1.empty("bounded", buffer=1500)
    state = state.update(*batches[0])
    assert int(state.buf_fill) == 1024 and (np.asarray(state.slot_bins) < 0).all()
    state = fold(batches[1:], state)
    assert int(state.buf_fill) == 1501  # overflowed
    assert (np.asarray(state.slot_bins) >= 0).any() and np.asarray(state.slot_complete).all()
    result = state.compute_with_bound()
    assert float(result.max_f1_lost) == 0 and bits(result.threshold) == want
    a = fold(batches[:1], F1.empty("bounded", buffer=1500))
    b = fold(batches[1:2], F1.empty("bounded", buffer=1500))
    merged = a.merge(b)
    assert int(merged.buf_fill) == 1501 and np.asarray(merged.slot_complete).any()
    two = flat(batches[:2])
    result = merged.compute_with_bound()
    assert float(result.max_f1_lost) == 0
    assert bits(result.threshold) == bits(ref.f1_threshold(*two))


def test_bounded_loss_is_within_its_bound():
    """With one slot and a moving distribution, candidates go unresolved: the answer is
    then within ``max_f1_lost`` of anomalib's f1, and that within ``max n_neg / (2 P)``."""
    r = np.random.default_rng(11)
    seen_loss = False
    for seed in range(5):
        batches = make_batches(200 + seed, n_batches=4, shape=(4, 1, 32, 32), rate=0.1)
        # the scale drifts: bins that mattered early stop mattering, and others start to
        batches = [(x * (1 + 0.3 * i) + r.normal(), y) for i, (x, y) in enumerate(batches)]
        batches = [(x.astype(np.float32), y) for x, y in batches]
        state = fold(batches, F1.empty("bounded", slots=1, buffer=0))
        result = state.compute_with_bound()
        scores, labels = flat(batches)
        thresholds, f1 = ref.f1_curve(scores, labels)
        got = np.flatnonzero(thresholds == np.float32(result.threshold))
        assert got.size == 1, "the bounded threshold is one of the scores"
        assert f1[got[0]] == np.float32(result.f1)
        lost = f1.max() - f1[got[0]]
        assert 0 <= lost <= float(result.max_f1_lost)
        counts = f1_curve.neg_pos(state.counts)
        prior = np.asarray(counts)[:, 0].max() / (2 * np.asarray(counts)[:, 1].sum())
        assert float(result.max_f1_lost) <= prior * (1 + 1e-4)
        seen_loss |= float(result.max_f1_lost) > 0
    assert seen_loss, "no case left a candidate bin unresolved: the test shows nothing"


def test_bounded_merge_of_same_slots_is_exact_and_of_others_is_bounded():
    batches = make_batches(12)
    a = fold(batches[:2], F1.empty("bounded", buffer=0))
    b = fold(batches[2:], F1.empty("bounded", buffer=0))
    merged = a.merge(b).compute_with_bound()
    scores, labels = flat(batches)
    thresholds, f1 = ref.f1_curve(scores, labels)
    at = np.flatnonzero(thresholds == np.float32(merged.threshold))
    assert at.size == 1 and f1.max() - f1[at[0]] <= float(merged.max_f1_lost)
    if float(merged.max_f1_lost) == 0:
        assert bits(merged.threshold) == bits(ref.f1_threshold(scores, labels))


# --- devices ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "bounded"])
@pytest.mark.parametrize("n_devices", [1, 8])
def test_sharded_batches_give_the_global_threshold(devices, mode, n_devices):
    mesh = jax.make_mesh((n_devices,), ("data",), devices=devices[:n_devices])
    sharding = NamedSharding(mesh, P("data"))
    batches = make_batches(13, shape=(8, 1, 16, 16))
    state = F1.empty(mode)
    for x, y in batches:
        state = state.update(jax.device_put(x, sharding), jax.device_put(y, sharding))
    assert bits(state.compute()) == bits(ref.f1_threshold(*flat(batches)))


@pytest.mark.parametrize("shared_slots", [True, False], ids=["axis_name", "local-slots"])
def test_shard_map_update_and_reduce(devices, shared_slots):
    """Bounded states inside shard_map. With ``update(axis_name=...)`` every device gives
    its slots to the bins one device folding all the data would choose, so ``reduce``
    equals that device's state; without, the answer stays within its bound."""
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
    axis = "data" if shared_slots else None

    def empty():
        return F1.empty("bounded", slots=4, buffer=0)  # small: gathered from 8 devices

    @jax.jit
    @functools.partial(compat.shard_map, mesh=mesh, in_specs=P("data"), out_specs=P())
    def fold_all(xs, ys):
        state = empty()
        for i in range(xs.shape[1]):
            state = state.update(xs[:, i], ys[:, i], axis_name=axis)
        return state.reduce("data")

    batches = make_batches(14, shape=(8, 16, 16))
    xs = np.stack([x for x, _ in batches], axis=1)  # [8 devices, batches, 16, 16]
    ys = np.stack([y for _, y in batches], axis=1)
    sharding = NamedSharding(mesh, P("data"))
    result = fold_all(jax.device_put(xs, sharding), jax.device_put(ys, sharding))
    result = result.compute_with_bound()
    thresholds, f1 = ref.f1_curve(xs, ys)
    at = np.flatnonzero(thresholds == np.float32(result.threshold))
    assert at.size == 1 and f1.max() - f1[at[0]] <= float(result.max_f1_lost)
    if shared_slots:
        one = fold([(xs[:, i], ys[:, i]) for i in range(xs.shape[1])], empty())
        assert [float(v) for v in one.compute_with_bound()] == [float(v) for v in result]


def test_stacked_states_reduce_like_sequential_merges():
    batches = make_batches(15)
    states = [F1.empty("bounded").update(x, y) for x, y in batches]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    sequential = functools.reduce(F1.merge, states)
    assert bits(stacked.reduce().compute()) == bits(sequential.compute())
    assert bits(sequential.compute()) == bits(ref.f1_threshold(*flat(batches)))
    with pytest.raises(ValueError, match="not stacked"):
        states[0].reduce()


# --- processes, through a reducer ---------------------------------------------------------


class ThreadReducer:
    """A ``jaxnorm.Reducer`` for ``n`` threads standing in for processes: each call blocks
    until every thread made it, then returns the min/min/sum over all of them."""

    def __init__(self, n: int):
        self.n = n
        self.barrier = threading.Barrier(n)
        self.inputs: dict[int, tuple] = {}
        self.calls = [0] * n

    def for_rank(self, rank):
        def reduce(mins, maxs, counts):
            assert np.shape(mins) == np.shape(maxs), "jaxnorm.Reducer takes one max per min"
            self.calls[rank] += 1
            self.inputs[rank] = (np.asarray(mins), np.asarray(maxs), np.asarray(counts))
            self.barrier.wait(timeout=60)
            parts = [self.inputs[i] for i in range(self.n)]
            out = (
                np.min([p[0] for p in parts], axis=0).astype(np.float32),
                np.max([p[1] for p in parts], axis=0).astype(np.float32),
                np.sum([p[2] for p in parts], axis=0).astype(np.int64),
            )
            self.barrier.wait(timeout=60)
            return out

        return reduce


def compute_in_threads(states):
    reducer = ThreadReducer(len(states))
    results, errors = [None] * len(states), []

    def run(rank):
        try:
            results[rank] = states[rank].compute_with_bound(reducer.for_rank(rank))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            reducer.barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(states))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(set(reducer.calls)) == 1, "processes made different numbers of collectives"
    return results


@pytest.mark.parametrize("mode", ["exact", "bounded"])
def test_reducer_across_processes_equals_one_process(mode):
    batches = make_batches(16, n_batches=6, shape=(6, 1, 24, 24))
    shards = [batches[0:3], batches[3:5], batches[5:]]
    states = [fold(s, F1.empty(mode)) for s in shards] + [F1.empty(mode)]  # one saw nothing
    want = ref.f1_threshold(*flat(batches))
    for result in compute_in_threads(states):
        assert bits(result.threshold) == bits(want)
        if mode == "exact":
            assert float(result.max_f1_lost) == 0


def test_reducer_one_class_fallbacks_use_the_global_extremes():
    r = np.random.default_rng(17)
    xs = [r.normal(size=30).astype(np.float32) for _ in range(2)]
    for mode in ("exact", "bounded"):
        states = [F1.empty(mode).update(x, np.zeros(30, bool)) for x in xs]
        for result in compute_in_threads(states):
            assert float(result.threshold) == max(x.max() for x in xs)
        states = [F1.empty(mode).update(x, np.ones(30, bool)) for x in xs]
        for result in compute_in_threads(states):
            assert float(result.threshold) == min(x.min() for x in xs)
