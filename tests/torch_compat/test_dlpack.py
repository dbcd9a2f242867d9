"""torch_compat's DLPack exchange: zero-copy on CPU, dtypes, shapes, devices, host fallback."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from torch_compat import HostCopyWarning, _dlpack, _dlpack_check, to_jax, to_torch

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NO_CUDA = (
    "needs a CUDA device and a CUDA build of torch (this machine's torch is CPU-only or sees "
    "no GPU)"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


@pytest.fixture(params=["fast", "public"])
def path(request, monkeypatch):
    """Both ways into jax: the direct jaxlib call and the public jax.dlpack.from_dlpack."""
    if request.param == "public":
        monkeypatch.setattr(_dlpack, "fast_from_dlpack", None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_zero_copy_both_ways(dtype, path):
    t = torch.randn(32, 1, 16, 16).to(dtype)
    assert t.data_ptr() % 64 == 0  # torch's CPU allocator aligns to 64 bytes
    a = to_jax(t)
    assert isinstance(a, jax.Array)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    assert a.dtype == jnp.dtype(str(dtype).removeprefix("torch."))
    back = to_torch(a, like=t)
    assert back.data_ptr() == a.unsafe_buffer_pointer()
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


@pytest.mark.parametrize("shape", [(), (0,), (7,), (2, 1, 3, 4)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_round_trip_keeps_dtype_shape_device_and_values(dtype, shape, path):
    t = (torch.randn(shape) * 10).to(dtype)
    a = to_jax(t)
    assert a.shape == tuple(shape)
    # without jax_enable_x64, float64 is narrowed (and cast back below)
    want = jnp.float32 if dtype == torch.float64 else jnp.dtype(str(dtype).removeprefix("torch."))
    assert a.dtype == want
    back = to_torch(a * 1, like=t)  # a computed result, as the callback gets back
    assert back.dtype == dtype and back.shape == t.shape and back.device == t.device
    expected = t.float().to(dtype) if dtype == torch.float64 else t
    assert torch.equal(back, expected)


def test_requires_grad_is_detached_without_copy():
    leaf = torch.randn(16, requires_grad=True)
    a = to_jax(leaf)  # torch refuses to export tensors that require grad: detached first
    assert a.unsafe_buffer_pointer() == leaf.data_ptr()
    assert not to_torch(a, like=leaf).requires_grad
    derived = leaf * 2
    np.testing.assert_array_equal(np.asarray(to_jax(derived)), derived.detach().numpy())


@pytest.mark.parametrize(
    "view",
    [
        lambda base: base[:, ::2],  # strided
        lambda base: base.t(),  # transposed
        lambda base: base[:1].expand(4, 6),  # broadcast (stride 0): jax refuses those
        lambda base: base.reshape(-1)[1:],  # contiguous but misaligned: jax copies
    ],
    ids=["strided", "transposed", "expanded", "misaligned"],
)
def test_non_contiguous_and_misaligned_views(view, path):
    t = view(torch.arange(24.0).reshape(4, 6))
    a = to_jax(t)
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    assert tuple(to_torch(a, like=t).shape) == tuple(t.shape)


def test_integer_like_keeps_floating_results():
    ints = torch.arange(4, dtype=torch.int32)
    result = to_torch(jnp.full((4,), 0.25, jnp.float32), like=ints)
    assert result.dtype == torch.float32  # normalized scores do not fit in integers


def test_host_fallback_warns_once_per_process(monkeypatch):
    """The path a CUDA tensor takes when jax has no GPU, simulated on CPU tensors."""
    monkeypatch.setattr(_dlpack, "jax_reads_device", lambda device: False)
    monkeypatch.setattr(_dlpack, "_host_copy_warned", False)
    t = torch.randn(5)
    with pytest.warns(HostCopyWarning, match="copied to host memory.*Shown once per process"):
        a = to_jax(t)
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_jax(torch.randn(5))  # no second warning


def test_jax_reads_cpu_and_not_unknown_devices():
    assert _dlpack.jax_reads_device(torch.device("cpu"))
    assert not _dlpack.jax_reads_device(torch.device("meta"))
    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    assert _dlpack.jax_reads_device(torch.device("cuda", 0)) == has_gpu


@requires_cuda
@pytest.mark.filterwarnings("ignore::torch_compat.HostCopyWarning")
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_round_trip(dtype):
    t = torch.randn(8, 3, device="cuda").to(dtype)
    a = to_jax(t)
    if _dlpack.jax_reads_device(t.device):
        assert next(iter(a.devices())).platform == "gpu"
        if dtype != torch.float64:
            assert a.unsafe_buffer_pointer() == t.data_ptr()  # zero-copy on the GPU
    else:
        assert next(iter(a.devices())).platform == "cpu"  # the documented host fallback
    back = to_torch(a * 1, like=t)
    assert back.device == t.device and back.dtype == dtype
    assert torch.equal(back.cpu(), t.cpu().float().to(dtype) if dtype == torch.float64 else t.cpu())


def _offset_copy(t: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """``t``'s values in a contiguous view that starts ``offset`` elements into its storage."""
    base = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = base[offset:].view(t.shape)
    view.copy_(t)
    return view


@requires_cuda
@pytest.mark.filterwarnings("ignore::torch_compat.HostCopyWarning")
@pytest.mark.parametrize("layout", ["allocated", "storage_offset"])
def test_cuda_outputs_through_the_callback(layout):
    """Fresh CUDA tensors, or views 4 bytes into their storage (XLA:GPU refuses misaligned
    entry parameters: the callback copies them), on the full path and then the steady one."""
    from tests.torch_compat import module_protocol as h

    place = (lambda t: t.cuda()) if layout == "allocated" else (lambda t: _offset_copy(t.cuda()))
    module = h.Module().cuda()
    cb = h.MinMaxNormalizationCallback()
    cb.setup(None, module, "fit")
    val = [{k: place(v) for k, v in h.make_outputs(i, boxes=False).items()} for i in range(3)]
    h.validate(cb, module, val)
    lo, hi = module.normalization_metrics.read()["image"]
    for seed in (1, 2, 3):  # the first batch leaves a plan, the later ones take it
        raw = h.make_outputs(seed, boxes=False)
        outputs = {k: place(v) for k, v in raw.items()}
        cb.on_test_batch_end(None, module, outputs, None, 0)
        assert outputs["anomaly_maps"].is_cuda and outputs["pred_scores"].is_cuda
        h.assert_matches_reference(
            {k: v.cpu() for k, v in outputs.items()}, raw, h.IMAGE_T, h.PIXEL_T, lo, hi
        )


@requires_cuda
def test_cuda_import_takes_the_fast_path_and_waits_for_torchs_stream(monkeypatch):
    if not _dlpack.jax_reads_device(torch.device("cuda")):
        pytest.skip("jax has no GPU backend here")
    real, calls = _dlpack.fast_from_dlpack, []
    monkeypatch.setattr(
        _dlpack, "fast_from_dlpack", lambda *args: calls.append(args[2]) or real(*args)
    )
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        t = torch.zeros(1 << 20, device="cuda")
        torch.cuda._sleep(500_000_000)  # the write below lands well after to_jax returns
        t.fill_(1.0)
        a = to_jax(t)  # no host sync: jax's stream must wait for `side`
    assert len(calls) == 1 and calls[0] is not None  # the direct call, with jax's stream
    assert float(jnp.sum(a)) == t.numel()


@requires_cuda
def test_pinned_cpu_tensor():
    t = torch.randn(16).pin_memory()
    a = to_jax(t)
    assert next(iter(a.devices())).platform == "cpu"
    np.testing.assert_array_equal(np.asarray(a), t.numpy())


def test_fast_path_finds_the_jaxlib_signature_then_falls_back_to_the_public_one(monkeypatch):
    real = _dlpack.fast_from_dlpack
    if real is None:
        pytest.skip("this jaxlib has no dlpack_managed_tensor_to_buffer")
    _dlpack_check.fast_path_ok(torch.device("cpu"))  # the first-use check: its calls uncounted
    calls = []

    def three_args_only(*args):
        calls.append(len(args))
        if len(args) != 3:
            raise TypeError("incompatible function arguments")
        return real(*args)

    monkeypatch.setattr(_dlpack, "fast_from_dlpack", three_args_only)
    monkeypatch.setattr(_dlpack, "_fast_arities", [5, 4, 3])
    t = torch.arange(4.0)
    np.testing.assert_array_equal(np.asarray(to_jax(t)), t.numpy())
    assert calls == [5, 4, 3] and _dlpack._fast_arities == [3]
    to_jax(t)
    assert calls == [5, 4, 3, 3]  # the arity found is kept

    def never(*args):
        calls.append(len(args))
        raise TypeError("incompatible function arguments")

    calls.clear()
    monkeypatch.setattr(_dlpack, "fast_from_dlpack", never)
    monkeypatch.setattr(_dlpack, "_fast_arities", [5, 4, 3])
    public = []
    real_public = jax.dlpack.from_dlpack
    monkeypatch.setattr(jax.dlpack, "from_dlpack", lambda x: public.append(1) or real_public(x))
    np.testing.assert_array_equal(np.asarray(to_jax(t)), t.numpy())
    assert calls == [5, 4, 3] and public == [1]
    assert _dlpack.fast_from_dlpack is None  # for good: no more tries
    to_jax(t)
    assert calls == [5, 4, 3] and public == [1, 1]


# -- the callback's per-batch exchange ------------------------------------------------------


def test_batch_exchange_is_zero_copy_on_cpu_both_ways():
    to_jax(torch.zeros(1))  # finds this jaxlib's direct call, as the callback's first batch does
    cpu = torch.device("cpu")
    if _dlpack.fast_from_dlpack is None or _dlpack.fast_to_dlpack is None:
        pytest.skip("this jaxlib has no direct DLPack calls: the callback uses to_jax/to_torch")
    assert _dlpack.batch_device_ok(cpu)
    assert not _dlpack.batch_device_ok(torch.device("meta"))
    tensors = [torch.randn(32), torch.randn(32, 1, 8, 8).to(torch.bfloat16)]
    arrays = _dlpack.import_batch(tensors, cpu)
    for t, a in zip(tensors, arrays, strict=True):
        assert a.unsafe_buffer_pointer() == t.data_ptr()
        np.testing.assert_array_equal(np.asarray(a, np.float32), t.float().numpy())
    results = [a * 2 for a in arrays]
    back = _dlpack.export_batch(results, cpu)
    for r, b, t in zip(results, back, tensors, strict=True):
        assert b.data_ptr() == r.unsafe_buffer_pointer() and b.dtype == t.dtype
        assert torch.equal(b, t * 2)


@requires_cuda
def test_cuda_batch_import_orders_jax_after_torch_once_per_batch(monkeypatch):
    if not _dlpack.jax_reads_device(torch.device("cuda")):
        pytest.skip("jax has no GPU backend here")
    to_jax(torch.zeros(1, device="cuda"))
    cuda = torch.device("cuda", torch.cuda.current_device())
    if not _dlpack.batch_device_ok(cuda):
        pytest.skip("jax's GPU exposes no external-ready-events stream: to_jax per tensor")
    orders = []
    real = _dlpack._order_after_torch
    monkeypatch.setattr(_dlpack, "_order_after_torch", lambda *a: orders.append(a) or real(*a))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        tensors = [torch.zeros(1 << 20, device="cuda"), torch.zeros(1 << 10, device="cuda")]
        torch.cuda._sleep(500_000_000)  # the writes below land well after import_batch returns
        for t in tensors:
            t.fill_(1.0)
        arrays = _dlpack.import_batch(tensors, cuda)  # no host sync: jax's stream waits
    assert len(orders) == 1
    assert [float(jnp.sum(a)) for a in arrays] == [t.numel() for t in tensors]


@requires_cuda
def test_cuda_batch_export_orders_torch_after_jax():
    if not _dlpack.jax_reads_device(torch.device("cuda")):
        pytest.skip("jax has no GPU backend here")
    to_jax(torch.zeros(1, device="cuda"))
    cuda = torch.device("cuda", torch.cuda.current_device())
    if not _dlpack.batch_device_ok(cuda):
        pytest.skip("jax's GPU exposes no external-ready-events stream: to_torch per array")
    x = jax.device_put(jnp.ones((2048, 2048)), jax.devices("gpu")[0])
    slow = jax.jit(lambda x: jax.lax.fori_loop(0, 50, lambda i, m: jnp.tanh(m @ m), x)[0])
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        (back,) = _dlpack.export_batch([slow(x)], cuda)
        got = back.clone()  # on `side`, which must wait for jax's result
    side.synchronize()
    want = np.asarray(slow(x))
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-6)


@requires_cuda
@pytest.mark.filterwarnings("ignore::torch_compat.HostCopyWarning")
def test_cuda_steady_batches_through_the_callback_wait_for_torchs_writes():
    from tests.torch_compat import module_protocol as h

    module = h.Module().cuda()
    cb = h.MinMaxNormalizationCallback()
    cb.setup(None, module, "fit")
    val = {k: v.cuda() for k, v in h.make_outputs(0, n=8, boxes=False).items()}
    h.validate(cb, module, [val])
    lo, hi = module.normalization_metrics.read()["image"]
    cb.on_test_start(None, module)
    for i in range(4):
        raw = h.make_outputs(10 + i, n=8, boxes=False)
        sources = {k: raw[k].cuda() for k in ("anomaly_maps", "pred_scores")}
        torch.cuda.synchronize()
        outputs = {k: torch.zeros_like(v) for k, v in sources.items()}
        torch.cuda._sleep(200_000_000)  # the values land well after the hook returns
        for k, v in sources.items():
            outputs[k].copy_(v)
        cb.on_test_batch_end(None, module, outputs, None, i)
        h.assert_matches_reference(
            {k: v.cpu() for k, v in outputs.items()},
            {k: raw[k] for k in sources},
            h.IMAGE_T,
            h.PIXEL_T,
            lo,
            hi,
        )
    if _dlpack.batch_device_ok(outputs["pred_scores"].device):
        assert cb.steady  # the later batches took the steady path


@requires_cuda
@pytest.mark.parametrize("offset", [1, 64])  # 4 and 256 bytes into the storage
def test_cuda_views_with_a_storage_offset_are_copied_before_jax_reads_them(offset):
    """XLA:GPU refuses a misaligned entry parameter when it runs (no copy, unlike its CPU
    client): to_jax and the callback's steady path hand jax an aligned copy instead."""
    if not _dlpack.jax_reads_device(torch.device("cuda")):
        pytest.skip("jax has no GPU backend here")
    base = torch.arange(32 * 65, dtype=torch.float32, device="cuda")
    view = base[offset : offset + 32 * 64].view(32, 64)
    assert view.is_contiguous() and _dlpack.misaligned(view) == (offset == 1)
    a = to_jax(view)
    assert a.unsafe_buffer_pointer() % _dlpack.CUDA_ALIGNMENT == 0
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: x * 2)(a)), 2 * view.cpu().numpy())
