"""CUDA-graph readiness of the Triton launchers (issue 13, item 3).

A call captured in a CUDA graph must not read device values on the host (a sync, and the value would
be frozen into the graph), must allocate only sizes that depend on shapes (a replay reuses the
captured addresses and sizes), and must not build anything lazily with a host-to-device copy. The
rules are checked on the CPU with the Triton launches stubbed out (``bench.host_overhead``) and the
launches planned as on an H100; the capture itself runs when CUDA is present.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mosear_fast
from bench.host_overhead import stub_launches
from mosear_fast.kernels.ar_attention import launch as ar_launch
from mosear_fast.kernels.ar_attention.function import ar_attention_triton
from mosear_fast.kernels.mose.function import mose_lora_triton
from mosear_fast.kernels.target import pretend
from tests.cases import av_layout, make_ar_inputs, make_mose_inputs

AR_ARGS = dict(num_modalities=3, balance=(1, 2), target=(0.5, 0.5), strength=0.5, threshold=0.0,
               modality_bias=None, causal=True, scale=0.25, query_mask=None, return_masses=False)


class HostRead(AssertionError):
    pass


# aten ops whose result needs the values on the host (a device sync on CUDA): scalar reads (item,
# bool, int, float, index all reach _local_scalar_dense) and ops whose output size depends on values.
HOST_READ_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                 "unique_consecutive", "unique_dim_consecutive", "equal", "is_nonzero", "allclose")


class _HostReadGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in HOST_READ_OPS:
            raise HostRead(f"host read: aten.{name}")
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())
                if i is not None):
            raise HostRead(f"host read: aten.{name} with a boolean mask (its size depends on the values)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_reads():
    """Every way a launcher could read a tensor's values on the host raises HostRead in the block:
    at the dispatcher, scalar reads (item, bool, int, float, index), nonzero, boolean-mask indexing and
    the other value-dependent ops of HOST_READ_OPS; above it, ``tolist`` and ``numpy`` (which read the
    data directly). The dispatch mode leaves nothing behind (patching Tensor.__getitem__ would: CPython
    does not restore its sequence slot)."""

    def refuse(name):
        def method(*args, **kwargs):
            raise HostRead(f"host read: Tensor.{name}")
        return method

    with pytest.MonkeyPatch.context() as mp, _HostReadGuard():
        for name in ("tolist", "numpy"):
            mp.setattr(torch.Tensor, name, refuse(name))
        yield


@contextlib.contextmanager
def recorded_allocations():
    """Records (function, size, dtype) of every torch.empty / zeros / full / tensor call in the block."""
    calls = []

    def recorder(name, real):
        def make(*args, **kwargs):
            out = real(*args, **kwargs)
            calls.append((name, tuple(out.shape), out.dtype))
            return out
        return make

    with pytest.MonkeyPatch.context() as mp:
        for name in ("empty", "zeros", "full", "tensor", "empty_like", "zeros_like"):
            mp.setattr(torch, name, recorder(name, getattr(torch, name)))
        yield calls


def _ar_decode(len_q=1, len_k=300, layout="av", seed=0):
    t = make_ar_inputs(1, 28, 4, len_q, len_k, 32, dtype=torch.bfloat16, layout=layout, seed=seed)
    return t["q"], t["k"], t["v"], t["key_modality"]


def _mose_decode(n_tokens=1, seed=0, top_k=1):
    t = make_mose_inputs(n_tokens, 64, 48, rank=16, top_k=top_k, dtype=torch.bfloat16, seed=seed, pad_fraction=0.0)
    return (t["x"], t["modality"], t["expert"], t["gate"], t["A"], t["B"], t["scale"].float(), t["out"])


def _ar_call(inputs, **kw):
    return lambda: ar_attention_triton(*inputs, **{**AR_ARGS, **kw})


def _mose_call(inputs):
    return lambda: mose_lora_triton(*inputs)


@pytest.mark.parametrize("op,len_q", [("ar", 1), ("ar", 3), ("mose", 1), ("mose", 2)])
def test_decode_launch_reads_nothing_back(op, len_q):
    call = _ar_call(_ar_decode(len_q=len_q)) if op == "ar" else _mose_call(_mose_decode(n_tokens=len_q, top_k=2))
    launches = [0]
    with pretend(), torch.no_grad(), stub_launches(counter=launches):
        call()  # the first call of a configuration builds its tables (outside capture)
        first = launches[0]
        with no_host_reads():
            call()
    assert first > 0 and launches[0] == 2 * first


def test_host_read_guard_catches_reads():
    """The guard of the test above does fail on each kind of host read."""
    t = torch.tensor([1, 0, 2])
    for read in (lambda: t[0].item(), lambda: t.tolist(), lambda: bool(t[0]), lambda: int(t[0]), lambda: float(t[0]),
                 lambda: t[t > 0], lambda: t.nonzero(), lambda: torch.nonzero(t), lambda: range(t[0]),
                 lambda: torch.unique(t), lambda: t.masked_select(t > 0), lambda: t.numpy()):
        with no_host_reads(), pytest.raises(HostRead):
            read()


def test_public_decode_ops_read_nothing_back_without_validation(monkeypatch):
    """The public ops with validate=False under the CUDA rule (value checks only with validate=True):
    validation, dispatch and the launcher together read nothing back."""
    from mosear_fast import _validation

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the dispatch to "triton" for CPU tensors
    monkeypatch.setattr(_validation, "_needs_value_checks", lambda t, validate: validate)
    q, k, v, key_modality = _ar_decode()
    x, modality, expert, gate, A, B, scale, out = _mose_decode()
    calls = [lambda: mosear_fast.ar_attention(q, k, v, key_modality, num_modalities=3, target=(1.0, 3.0),
                                              backend="triton", validate=False),
             lambda: mosear_fast.mose_lora(x, modality, expert, gate, A, B, scale, out, backend="triton",
                                           validate=False)]
    with pretend(), torch.no_grad(), stub_launches():
        for call in calls:
            call()
            with no_host_reads():
                call()


@pytest.mark.parametrize("op", ["ar", "mose"])
def test_decode_allocations_depend_on_shapes_only(op):
    """Two calls with the same shapes and different values (modality layouts, expert choices, padding)
    allocate the same sizes, and a second call of a configuration allocates no table."""
    if op == "ar":
        first, second = _ar_decode(seed=1, layout="av"), _ar_decode(seed=2, layout="random")
        second[3].fill_(-1)  # every key padding
        calls = [_ar_call(first), _ar_call(second)]
    else:
        first, second = _mose_decode(seed=1), _mose_decode(seed=2)
        second[1].fill_(-1)  # no adapter
        calls = [_mose_call(first), _mose_call(second)]
    ar_launch._TABLES.clear()
    ar_launch._launch.cache_clear()
    with pretend(), torch.no_grad(), stub_launches():
        sizes = []
        for call in calls:
            with recorded_allocations() as allocated:
                call()
            sizes.append(allocated)
    if op == "ar":  # the first call built the class tables, the second reused them
        assert [c for c in sizes[0] if c[0] == "tensor"] and not [c for c in sizes[1] if c[0] == "tensor"]
    assert [c for c in sizes[0] if c[0] != "tensor"] == sizes[1]


def test_ar_tables_are_built_once_per_configuration():
    ar_launch._TABLES.clear()
    ar_launch._launch.cache_clear()
    inputs = _ar_decode()
    with pretend(), torch.no_grad(), stub_launches():
        with recorded_allocations() as first:
            _ar_call(inputs)()
        with recorded_allocations() as same:
            _ar_call(_ar_decode(len_q=5, len_k=128))()  # other shapes, same configuration
        with recorded_allocations() as other:
            _ar_call(inputs, modality_bias=(0.5, 0.0, -0.5))()  # another configuration
    assert sum(c[0] == "tensor" for c in first) == 4  # class_of_mod, class_mod, class_bias, tau
    assert not [c for c in same if c[0] == "tensor"]
    assert sum(c[0] == "tensor" for c in other) == 4


def test_prepare_tables_builds_what_the_op_uses(monkeypatch):
    """``prepare_tables`` (before capture) with the op's normalised arguments builds the tables the
    public op then finds: the call adds none."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ar_launch._TABLES.clear()
    ar_launch._launch.cache_clear()
    from mosear_fast._validation import check_target

    q, k, v, key_modality = _ar_decode()
    target = check_target("target", (1.0, 3.0), 2)
    ar_launch.prepare_tables(q.device, num_modalities=3, balance=(1, 2), target=target)
    assert len(ar_launch._TABLES) == 1
    with pretend(), torch.no_grad(), stub_launches():
        mosear_fast.ar_attention(q, k, v, key_modality, num_modalities=3, target=(1.0, 3.0), backend="triton")
    assert len(ar_launch._TABLES) == 1


def test_first_call_of_a_configuration_inside_capture_names_the_warm_up(monkeypatch):
    """Building tables inside capture raises before any device work, saying what to call first."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    made = []
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a))
    with pytest.raises(RuntimeError, match=r"call ar_attention once with the same arguments before capture.*"
                                           r"prepare_tables"):
        ar_launch.class_tables(torch.device("cuda", 0), 3, (1, 2), (0.25, 0.75), None, False)
    assert not made


def test_launch_plans_follow_the_target():
    """The plan cache is keyed by the planning facts: the same shapes plan differently in the
    interpreter and as an H100 (splits fill 132 SMs), and each answer stays right after the other."""
    inputs = _ar_decode(len_k=4096)
    q = inputs[0]
    args = dict(batch=1, n_q_heads=28, n_kv_heads=4, n_classes=3, dtype=q.dtype, device=q.device)
    interpreted = ar_launch.launch_plan(1, 4096, 32, **args)
    with pretend():
        h100 = ar_launch.launch_plan(1, 4096, 32, **args)
    assert interpreted["num_splits"] == 1 and h100["num_splits"] > 1
    assert ar_launch.launch_plan(1, 4096, 32, **args) == interpreted


# ------------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")


def _cuda_decode_inputs():
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 28, 1, 128, generator=g).to(device, torch.bfloat16)
    k = torch.randn(1, 4, 1000, 128, generator=g).to(device, torch.bfloat16)
    v = torch.randn(1, 4, 1000, 128, generator=g).to(device, torch.bfloat16)
    key_modality = av_layout(1000).expand(1, 1000).clone().to(device)
    mose = make_mose_inputs(1, 256, 192, rank=16, top_k=2, dtype=torch.bfloat16, device=device, pad_fraction=0.0)
    return (q, k, v, key_modality), mose


def _cuda_step(ar_inputs, mose):
    o = mosear_fast.ar_attention(*ar_inputs, num_modalities=3, target=(1.0, 2.0), backend="triton",
                                 validate=False)
    y = mosear_fast.mose_lora(mose["x"], mose["modality"], mose["expert"], mose["gate"], mose["A"], mose["B"],
                              mose["scale"], mose["out"], backend="triton", validate=False)
    return o, y


@needs_cuda
def test_triton_cuda_graph_captures_and_replays_a_decode_step():
    ar_inputs, mose = _cuda_decode_inputs()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compiles, builds the tables
        for _ in range(2):
            _cuda_step(ar_inputs, mose)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _cuda_step(ar_inputs, mose)
    ar_inputs[0].copy_(torch.randn_like(ar_inputs[0]))
    mose["x"].copy_(torch.randn_like(mose["x"]))
    mose["expert"].copy_(mose["expert"].flip(1))  # new routing values, same shapes
    graph.replay()
    expected = _cuda_step(ar_inputs, mose)
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)


@needs_cuda
def test_triton_cuda_first_call_inside_capture_raises_with_the_warm_up():
    ar_inputs, _ = _cuda_decode_inputs()
    ar_launch._TABLES.clear()
    ar_launch._launch.cache_clear()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before capture"):
        with torch.cuda.graph(graph):
            mosear_fast.ar_attention(*ar_inputs, num_modalities=3, modality_bias=(0.1, 0.2, 0.3),
                                     backend="triton", validate=False)
