"""The registered ops (``mosear_fast.library``): ``torch.library.opcheck`` on every dtype, and the same
outputs and gradients as the eager backends (whose autograd Functions they replace under compile)."""

from __future__ import annotations

import pytest
import torch

from mosear_fast import library
from mosear_fast.kernels.ar_attention.torch_backend import ar_attention_torch
from mosear_fast.kernels.mose.torch_backend import mose_lora_torch
from mosear_fast.kernels.mose.torch_linear import mose_linear_torch
from tests.cases import make_ar_inputs, make_mose_inputs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32 also checks the gradients numerically (gradcheck-like "test_autograd_registration" and
# "test_aot_dispatch_dynamic" run on every dtype)
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _mose(dtype, top_k=1, n_tokens=11, **kw):
    d = make_mose_inputs(n_tokens, 12, 10, n_modalities=2, n_experts=3, rank=4, top_k=top_k, dtype=dtype, **kw)
    d["gate"] = d["gate"].to(dtype)  # a router in the model's dtype
    return d


def _leaves(d, names):
    return {n: (d[n].clone().requires_grad_(True) if n in names else d[n]) for n in d}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top_k", [1, 2])
def test_opcheck_mose_lora(dtype, top_k):
    d = _leaves(_mose(dtype, top_k), ("x", "gate", "A", "B", "out"))
    args = (d["x"], d["modality"], d["expert"], d["gate"], d["A"], d["B"], d["scale"], d["out"], True, "torch", False)
    torch.library.opcheck(library.mose_lora_op, args, test_utils=OPCHECK_TESTS)
    no_out = args[:7] + (None, True, "torch", False)
    torch.library.opcheck(library.mose_lora_op, no_out, test_utils=OPCHECK_TESTS)
    frozen = (d["x"].detach(), *args[1:3], d["gate"].detach(), d["A"].detach(), d["B"].detach(), d["scale"], None,
              False, "torch", False)
    torch.library.opcheck(library.mose_lora_op, frozen, test_utils=OPCHECK_TESTS)  # inference: h not saved


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_mose_linear(dtype, with_bias):
    d = _mose(dtype, top_k=2, with_out=False)
    g = torch.Generator().manual_seed(1)
    d["weight"] = torch.randn(10, 12, generator=g).to(dtype)
    d["bias"] = torch.randn(10, generator=g).to(dtype) if with_bias else None
    d = _leaves(d, ("x", "gate", "A", "B", "weight") + (("bias",) if with_bias else ()))
    for norm in (False, True):
        args = (d["x"], d["weight"], d["bias"], d["modality"], d["expert"], d["gate"], d["A"], d["B"], d["scale"],
                norm, True, "torch", False)
        torch.library.opcheck(library.mose_linear_op, args, test_utils=OPCHECK_TESTS)


def _ar_case(dtype, **kw):
    d = make_ar_inputs(1, 4, 2, 3, 7, 8, dtype=dtype, seed=2)
    base = dict(num_modalities=3, balance=[1, 2], target=[0.6, 0.4], target_per_head=False, strength=0.5,
                threshold=0.0, modality_bias=None, causal=True, scale=8 ** -0.5, window=None, softcap=None,
                balance_by="mass")
    base.update(kw)
    return d, base


AR_VARIANTS = {
    "plain": {},
    "per_head_window_softcap": dict(target=[0.5, 0.5, 0.7, 0.3, 0.1, 0.9, 0.4, 0.6], target_per_head=True, window=4,
                                    softcap=2.0, modality_bias=[0.0, 0.5, -0.5]),
    "contribution_uniform": dict(target=None, balance_by="contribution", causal=False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(AR_VARIANTS))
def test_opcheck_ar_attention(dtype, variant):
    d, s = _ar_case(dtype, **AR_VARIANTS[variant])
    q, k, v = (d[n].clone().requires_grad_(True) for n in "qkv")
    query_mask = torch.tensor([[True, False, True]])
    for masses in (False, True):
        args = (q, k, v, d["key_modality"], query_mask, *s.values(), masses, "torch", None, None, None, 2)
        torch.library.opcheck(library.ar_attention_op, args, test_utils=OPCHECK_TESTS)


# ------------------------------------------------------------------------------------------------
# Same outputs and gradients as the eager backends
# ------------------------------------------------------------------------------------------------


def _grads(y, leaves):
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(y.shape, generator=g).to(y.dtype)
    return torch.autograd.grad(y, leaves, dy, allow_unused=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top_k", [1, 2])
def test_mose_lora_matches_eager_backend(dtype, top_k):
    d = _mose(dtype, top_k, n_tokens=40)
    names = ("x", "gate", "A", "B", "out")
    eager, op = _leaves(d, names), _leaves(d, names)
    scale = d["scale"].float()
    ref = mose_lora_torch(eager["x"], d["modality"], d["expert"], eager["gate"], eager["A"], eager["B"], scale,
                          eager["out"])
    got = library.mose_lora(op["x"], d["modality"], d["expert"], op["gate"], op["A"], op["B"], scale, op["out"])
    assert torch.equal(got, ref)
    for name, a, b in zip(names, _grads(got, [op[n] for n in names]), _grads(ref, [eager[n] for n in names]),
                          strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mose_linear_matches_eager_backend(dtype):
    d = _mose(dtype, 2, n_tokens=40, with_out=False)
    g = torch.Generator().manual_seed(1)
    d["weight"], d["bias"] = torch.randn(10, 12, generator=g).to(dtype), torch.randn(10, generator=g).to(dtype)
    names = ("x", "weight", "bias", "gate", "A", "B")
    eager, op = _leaves(d, names), _leaves(d, names)
    scale = d["scale"].float()
    args = lambda t: (t["x"], t["weight"], t["bias"], d["modality"], d["expert"], t["gate"], t["A"], t["B"], scale)  # noqa: E731
    ref, ref_norm = mose_linear_torch(*args(eager), return_update_norm=True)
    got, got_norm = library.mose_linear(*args(op), return_update_norm=True)
    assert torch.equal(got, ref) and torch.equal(got_norm, ref_norm)
    for name, a, b in zip(names, _grads(got, [op[n] for n in names]), _grads(ref, [eager[n] for n in names]),
                          strict=True):
        assert torch.equal(a, b), name


def test_mose_only_needed_gradients_are_computed():
    d = _mose(torch.float32, 1)
    leaves = _leaves(d, ("A",))
    y = library.mose_lora(leaves["x"], d["modality"], d["expert"], d["gate"], leaves["A"], d["B"], d["scale"],
                          d["out"])
    (dA,) = torch.autograd.grad(y.sum(), [leaves["A"]])
    assert dA.shape == d["A"].shape and dA.abs().sum() > 0


@pytest.mark.parametrize("variant", list(AR_VARIANTS))
def test_ar_attention_matches_eager_backend(variant):
    d, s = _ar_case(torch.float32, **AR_VARIANTS[variant])
    target = s["target"]
    if s.pop("target_per_head"):
        target = tuple(tuple(target[i:i + 2]) for i in range(0, len(target), 2))
    kw = dict(s, target=None if target is None else tuple(target), balance=tuple(s["balance"]),
              modality_bias=None if s["modality_bias"] is None else tuple(s["modality_bias"]),
              query_mask=torch.tensor([[True, False, True]]), chunk_size=2)
    eager = [d[n].clone().requires_grad_(True) for n in "qkv"]
    op = [d[n].clone().requires_grad_(True) for n in "qkv"]
    ref, ref_masses = ar_attention_torch(*eager, d["key_modality"], return_masses=True, **kw)
    got, got_masses = library.ar_attention(*op, d["key_modality"], return_masses=True, **kw)
    assert torch.equal(got, ref) and torch.equal(got_masses, ref_masses)
    for name, a, b in zip("qkv", _grads(got, op), _grads(ref, eager), strict=True):
        assert torch.equal(a, b), name


def test_ar_backward_refuses_double_backward():
    d, s = _ar_case(torch.float32)
    q = d["q"].clone().requires_grad_(True)
    kw = dict(s, balance=tuple(s["balance"]), target=tuple(s["target"]))
    kw.pop("target_per_head")
    o = library.ar_attention(q, d["k"], d["v"], d["key_modality"], query_mask=None, return_masses=False, **kw)
    (dq,) = torch.autograd.grad(o.sum(), [q], create_graph=True)
    with pytest.raises((RuntimeError, NotImplementedError), match="double backward is not implemented"):
        dq.sum().backward()


# ------------------------------------------------------------------------------------------------
# The Triton backend behind the same ops (the interpreter on the CPU; compiled kernels on CUDA)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["mose_lora", "mose_linear", "ar_attention"])
def test_opcheck_triton_backend(device, op):
    if op == "ar_attention":
        a, s = _ar_case(torch.float32)
        q, k, v = (a[n].to(device).requires_grad_(True) for n in "qkv")
        args = (q, k, v, a["key_modality"].to(device), None, *s.values(), True, "triton", None, None, None, None)
        torch.library.opcheck(library.ar_attention_op, args, test_utils=OPCHECK_TESTS)
        return
    d = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in _mose(torch.float32, 2).items()}
    d = _leaves(d, ("x", "gate", "A", "B", "out"))
    args = (d["x"], d["modality"], d["expert"], d["gate"], d["A"], d["B"], d["scale"], d["out"], True, "triton",
            False)
    if op == "mose_lora":
        torch.library.opcheck(library.mose_lora_op, args, test_utils=OPCHECK_TESTS)
        return
    w = torch.randn(10, 12, device=device, requires_grad=True)
    args = (d["x"], w, None, *args[1:7], True, True, "triton", True)  # with the norm, deterministic
    torch.library.opcheck(library.mose_linear_op, args, test_utils=OPCHECK_TESTS)


def test_triton_backend_gradients_match_its_autograd_functions(device):
    from mosear_fast.kernels.mose.function import mose_linear_triton

    d = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in _mose(torch.float32, 2).items()}
    d["weight"], d["bias"] = torch.randn(10, 12, device=device), torch.randn(10, device=device)
    names = ("x", "weight", "gate", "A", "B")
    eager, op = _leaves(d, names), _leaves(d, names)
    scale = d["scale"].float()
    args = lambda t: (t["x"], t["weight"], d["bias"], d["modality"], d["expert"], t["gate"], t["A"], t["B"], scale)  # noqa: E731
    ref = mose_linear_triton(*args(eager), deterministic=True)
    got = library.mose_linear(*args(op), backend="triton", deterministic=True)
    assert torch.equal(got, ref)
    for name, a, b in zip(names, _grads(got, [op[n] for n in names]), _grads(ref, [eager[n] for n in names]),
                          strict=True):
        assert torch.equal(a, b), name
