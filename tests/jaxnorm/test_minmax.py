"""jaxnorm.MinMax: update, merge, reduce, on one device and on 8 simulated devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
from jaxnorm.testing import count_compiles
from tests import compat, reference

batches_st = st.lists(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=7),
        elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False),  # XLA: FTZ
    ),
    min_size=1,
    max_size=5,
)


def fold(batches, use_jit=False):
    update = jax.jit(jaxnorm.MinMax.update) if use_jit else jaxnorm.MinMax.update
    state = jaxnorm.MinMax.empty()
    for b in batches:
        state = update(state, b)
    return state


def as_tuple(state):
    return float(state.min), float(state.max)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@settings(max_examples=40, deadline=None)
@given(batches=batches_st, seed=st.integers(0, 2**16))
def test_update_equals_numpy_over_concatenation_in_any_order(use_jit, batches, seed):
    want = reference.min_max(*batches)
    assert as_tuple(fold(batches, use_jit)) == want
    order = np.random.default_rng(seed).permutation(len(batches))
    assert as_tuple(fold([batches[i] for i in order], use_jit)) == want


def test_empty_is_plus_minus_inf_and_is_empty():
    e = jaxnorm.MinMax.empty()
    assert float(e.min) == np.inf and float(e.max) == -np.inf
    assert bool(e.is_empty)
    assert not bool(e.update(np.array([3.0])).is_empty)
    assert e.min.dtype == e.max.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16, np.int32, np.float64], ids=str)
def test_update_accepts_dtypes_and_stores_float32(dtype):
    s = jaxnorm.MinMax.empty().update(np.array([-3, 7, 2]).astype(dtype))
    assert (float(s.min), float(s.max)) == (-3.0, 7.0)
    assert s.min.dtype == jnp.float32


def test_mask_excludes_entries():
    x = np.array([[-100.0, 1.0, 2.0], [3.0, 50.0, 4.0]], np.float32)
    m = np.array([[False, True, True], [True, False, True]])
    assert as_tuple(jaxnorm.MinMax.empty().update(x, m)) == (1.0, 4.0)
    # a broadcasting mask (one flag per row)
    row = np.array([[False], [True]])
    assert as_tuple(jaxnorm.MinMax.empty().update(x, row)) == (3.0, 50.0)
    # an all-False mask leaves the state empty
    assert bool(jaxnorm.MinMax.empty().update(x, np.zeros_like(m)).is_empty)


def test_nonfinite_values_are_skipped_and_counted():
    x = np.array([np.nan, 1.0, np.inf, -2.0, -np.inf], np.float32)
    state, n_bad = jaxnorm.MinMax.empty().update_and_count(x)
    assert as_tuple(state) == (-2.0, 1.0) and int(n_bad) == 3
    # masked-out non-finite entries are not counted
    mask = np.array([False, True, True, True, True])
    state, n_bad = jaxnorm.MinMax.empty().update_and_count(x, mask)
    assert int(n_bad) == 2
    state, n_bad = jaxnorm.MinMax.empty().update_and_count(np.array([1.0, 2.0]))
    assert int(n_bad) == 0
    state, n_bad = jaxnorm.MinMax.empty().update_and_count(np.array([np.nan]))
    assert bool(state.is_empty) and int(n_bad) == 1


@pytest.mark.parametrize("size", [7, 4096, 5000, 2**20 + 3])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_found_in_large_batches(size, bad):
    # XLA:CPU's vectorised reductions lose NaN above a few thousand values: the count must not.
    rng = np.random.default_rng(size)
    x = rng.normal(size=size).astype(np.float32)
    where = rng.choice(size, 2, replace=False)
    x[where] = bad
    state, n_bad = jaxnorm.MinMax.empty().update_and_count(x)
    assert int(n_bad) == 2
    assert as_tuple(state) == reference.min_max(np.delete(x, where))
    state, n_bad = jax.jit(jaxnorm.MinMax.update_and_count)(jaxnorm.MinMax.empty(), x)
    assert int(n_bad) == 2 and as_tuple(state) == reference.min_max(np.delete(x, where))


def test_finite_values_whose_sum_overflows_are_not_counted():
    x = np.full(1000, 3e38, np.float32)
    x[0] = -3e38
    state, n_bad = jaxnorm.MinMax.empty().update_and_count(x)
    assert int(n_bad) == 0 and as_tuple(state) == reference.min_max(x)


def test_empty_batch_is_a_no_op():
    s = jaxnorm.MinMax.empty().update(np.array([1.0, 2.0]))
    assert as_tuple(s.update(np.zeros((0, 3), np.float32))) == (1.0, 2.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(batches_st, min_size=3, max_size=3))
def test_merge_is_associative_commutative_idempotent_with_identity(groups):
    a, b, c = (fold(g) for g in groups)
    e = jaxnorm.MinMax.empty()
    assert as_tuple(a.merge(b).merge(c)) == as_tuple(a.merge(b.merge(c)))
    assert as_tuple(a.merge(b)) == as_tuple(b.merge(a))
    assert as_tuple(a.merge(a)) == as_tuple(a)
    assert as_tuple(a.merge(e)) == as_tuple(e.merge(a)) == as_tuple(a)
    assert as_tuple(a.merge(b).merge(c)) == reference.min_max(*groups[0], *groups[1], *groups[2])


def test_stacked_reduce_equals_sequential_merges():
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(5, 3)).astype(np.float32) * (i + 1) for i in range(8)]
    states = [jaxnorm.MinMax.empty().update(b) for b in batches]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    sequential = functools.reduce(jaxnorm.MinMax.merge, states)
    assert as_tuple(stacked.reduce()) == as_tuple(sequential)
    # per-device states from vmap reduce the same way
    vmapped = jax.vmap(lambda b: jaxnorm.MinMax.empty().update(b))(jnp.stack(batches))
    assert as_tuple(vmapped.reduce()) == as_tuple(sequential)


def test_bad_input_raises_clear_error():
    s = jaxnorm.MinMax.empty()
    with pytest.raises(ValueError, match="values: expected an array, got str"):
        s.update("x")
    with pytest.raises(ValueError, match=r"mask: shape \(2,\) does not broadcast .* \(3,\)"):
        s.update(np.ones(3), np.ones(2, bool))
    with pytest.raises(ValueError, match="mask: dtype float64 is not bool"):
        s.update(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="values: dtype complex"):
        s.update(np.ones(3, np.complex64))


def test_update_does_not_recompile_for_new_values():
    x = np.ones((4, 4), np.float32)
    jaxnorm.MinMax.empty().update(x)
    with count_compiles() as log:
        s = jaxnorm.MinMax.empty()
        for i in range(20):
            s = s.update(x * i)
    assert log.count == 0, log.names
    assert as_tuple(s) == (0.0, 19.0)


def test_pytree_roundtrip_under_jit():
    @jax.jit
    def step(state, x):
        return state.update(x * 2)

    s = step(jaxnorm.MinMax.empty(), jnp.arange(5.0))
    assert isinstance(s, jaxnorm.MinMax) and as_tuple(s) == (0.0, 8.0)
    leaves, treedef = jax.tree.flatten(s)
    assert len(leaves) == 2 and as_tuple(jax.tree.unflatten(treedef, leaves)) == (0.0, 8.0)


# --- several devices (8 simulated CPU devices, see conftest.py) -------------------------


@pytest.fixture(scope="module")
def mesh(devices):
    return jax.make_mesh((len(devices),), ("data",), devices=devices)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 1, 8, 8)).astype(np.float32)
    x[11, 0, 3, 3] = 42.0  # extremes on one shard only
    x[2, 0, 0, 1] = -17.0
    return x


@pytest.mark.parametrize("n_devices", [1, 8])
def test_sharded_input_under_jit_gives_global_stats(devices, data, n_devices):
    mesh = jax.make_mesh((n_devices,), ("data",), devices=devices[:n_devices])
    x = jax.device_put(data, NamedSharding(mesh, P("data")))
    assert len(x.sharding.device_set) == n_devices
    state = jax.jit(lambda s, x: s.update(x))(jaxnorm.MinMax.empty(), x)
    assert as_tuple(state) == (-17.0, 42.0) == reference.min_max(data)
    # mask sharded the same way
    mask = jax.device_put(data < 40, NamedSharding(mesh, P("data")))
    assert as_tuple(jaxnorm.MinMax.empty().update(x, mask)) == reference.min_max(data[data < 40])


@pytest.mark.parametrize("n_devices", [1, 8])
def test_reduce_inside_shard_map_equals_single_device(devices, data, n_devices):
    mesh = jax.make_mesh((n_devices,), ("data",), devices=devices[:n_devices])

    @jax.jit
    @functools.partial(compat.shard_map, mesh=mesh, in_specs=P("data"), out_specs=P())
    def global_stats(x):
        local = jaxnorm.MinMax.empty().update(x)
        return local.reduce("data")

    x = jax.device_put(data, NamedSharding(mesh, P("data")))
    assert as_tuple(global_stats(x)) == as_tuple(jaxnorm.MinMax.empty().update(data))


def test_per_device_states_stacked_reduce_equals_collective(devices, data, mesh):
    @jax.jit
    @functools.partial(compat.shard_map, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    def local_states(x):
        s = jaxnorm.MinMax.empty().update(x)
        return jax.tree.map(lambda a: a[None], s)

    stacked = local_states(jax.device_put(data, NamedSharding(mesh, P("data"))))
    assert stacked.min.shape == (len(devices),)
    shards = np.split(data, len(devices))
    sequential = functools.reduce(
        jaxnorm.MinMax.merge, [jaxnorm.MinMax.empty().update(s) for s in shards]
    )
    assert as_tuple(stacked.reduce()) == as_tuple(sequential) == reference.min_max(data)


def test_reduce_under_pmap(devices, data):
    shards = data.reshape(len(devices), -1)
    # The CPU devices by name: pmap takes the default backend's otherwise (a GPU's in gpu_check).
    reduce = jax.pmap(
        lambda x: jaxnorm.MinMax.empty().update(x).reduce("i"), axis_name="i", devices=devices
    )
    out = reduce(shards)
    assert np.all(np.asarray(out.min) == data.min()) and np.all(np.asarray(out.max) == data.max())


def test_unpacks_as_min_max():
    lo, hi = jaxnorm.MinMax.empty().update(np.array([2.0, -1.0]))
    assert (float(lo), float(hi)) == (-1.0, 2.0)


@pytest.mark.skipif(
    jax.__version_info__ < (0, 7),
    reason="jax < 0.7 exports every lax.platform_dependent branch behind a constant platform "
    "index (XLA drops the others when it compiles), so the export cannot show the choice",
)
@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
def test_accelerators_fold_without_a_conditional(platform):
    """On accelerators a conditional reads its predicate back to the host (XLA:GPU), which
    would stall every batch: they lower only the branch-free exact pass, three fused sibling
    reductions (min, max, count), while CPU keeps its conditional fast path (six: plain min,
    max and sum, then the exact pass)."""
    x = jax.ShapeDtypeStruct((32, 1, 64, 64), jnp.float32)
    fold = jax.jit(lambda s, v: s.update_and_count(v))

    def reductions(target):
        exported = jax.export.export(fold, platforms=[target])(jaxnorm.MinMax.empty(), x)
        return exported.mlir_module().count("stablehlo.reduce")

    assert reductions(platform) == 3
    assert reductions("cpu") == 6  # the negative control: the conditional fast path
