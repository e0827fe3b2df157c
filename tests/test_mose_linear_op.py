"""mose_linear (base linear + MoSE update in one op) on every backend against the float64 reference:
output, update norms, gradients (x, gate, A, B, and weight and bias when they require grad)."""

import pytest
import torch
import torch.nn.functional as F

from mosear_fast import mose_linear
from mosear_fast.kernels.mose import mose_lora_reference
from mosear_fast.tolerances import assert_close

from .cases import make_mose_inputs
from .conftest import MOSE_BACKENDS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROUTING = ("modality", "expert", "gate", "A", "B", "scale")


def _case(n, d_in, d_out, *, dtype=torch.float32, device="cpu", bias=True, seed=0, **kw):
    inputs = make_mose_inputs(n, d_in, d_out, dtype=dtype, device=device, with_out=False, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    inputs["weight"] = (torch.randn(d_out, d_in, generator=g) * d_in ** -0.5).to(dtype=dtype, device=device)
    inputs["bias"] = torch.randn(d_out, generator=g).to(dtype=dtype, device=device) if bias else None
    return inputs


def _reference(inputs, leaves=None):
    """Float64 (y, update norm before scale) from the naive reference (cpu, differentiable in leaves)."""
    t = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    t.update(leaves or {})
    f64 = {k: (t[k].double() if t[k] is not None and t[k].is_floating_point() else t[k])
           for k in ("x", "weight", "bias", "gate", "A", "B")}
    base = F.linear(f64["x"], f64["weight"], f64["bias"])
    y = mose_lora_reference(f64["x"], t["modality"], t["expert"], f64["gate"], f64["A"], f64["B"], t["scale"], base)
    raw = mose_lora_reference(f64["x"], t["modality"], t["expert"], f64["gate"], f64["A"], f64["B"], 1.0)
    return y, base, raw.detach().norm(dim=-1)


def _run(inputs, backend, **kw):
    return mose_linear(inputs["x"], inputs["weight"], inputs["bias"], *(inputs[k] for k in ROUTING),
                       backend=backend, **kw)


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_forward_and_norm_match_reference(backend, dtype, top_k, device):
    inputs = _case(37, 19, 23, rank=8, top_k=top_k, dtype=dtype, device=device, pad_fraction=0.2)
    y, norm = _run(inputs, backend, return_update_norm=True)
    ref, base, ref_norm = _reference(inputs)
    assert y.dtype == dtype and norm.dtype == torch.float32 and norm.shape == (37,)
    assert_close(y.double().cpu() - base, ref - base, dtype, what="update")
    assert_close(norm, ref_norm, dtype, what="update norm")
    skip = (inputs["modality"] == -1).cpu()
    assert skip.any() and torch.equal(norm.cpu()[skip], torch.zeros(int(skip.sum())))
    # rows without adapter: the base layer exactly (same dtype's F.linear)
    plain = F.linear(inputs["x"], inputs["weight"], inputs["bias"])
    assert_close(y[skip.to(y.device)], plain[skip.to(y.device)], dtype)


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_gradients_match_float64_reference(backend, dtype, top_k, device):
    inputs = _case(31, 12, 10, rank=8, top_k=top_k, dtype=dtype, device=device)
    names = ["x", "gate", "A", "B"]
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in names}
    y, norm = _run(dict(inputs, **leaves), backend, return_update_norm=True)
    assert not norm.requires_grad
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    y.backward(dy)
    ref_leaves = {n: inputs[n].detach().cpu().double().requires_grad_(True) for n in names}
    ref, _, _ = _reference(inputs, ref_leaves)
    ref.backward(dy.double().cpu())
    for n in names:
        assert leaves[n].grad is not None and leaves[n].grad.dtype == leaves[n].dtype, n
        assert_close(leaves[n].grad, ref_leaves[n].grad, dtype, what=f"grad {n}")
    assert inputs["weight"].grad is None


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_weight_and_bias_gradients_when_they_require_grad(backend, bias, device):
    inputs = _case(21, 9, 11, rank=4, top_k=2, device=device, bias=bias)
    names = ["x", "weight", "A"] + (["bias"] if bias else [])
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in names}
    y = _run(dict(inputs, **leaves), backend)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
    y.backward(dy)
    ref_leaves = {n: inputs[n].detach().cpu().double().requires_grad_(True) for n in names}
    ref, _, _ = _reference(inputs, ref_leaves)
    ref.backward(dy.double().cpu())
    for n in names:
        assert_close(leaves[n].grad, ref_leaves[n].grad, torch.float32, what=f"grad {n}")


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
@pytest.mark.parametrize("n", [0, 1])
def test_tiny_n_and_all_rows_unadapted(backend, n, device):
    inputs = _case(n, 6, 5, top_k=2, device=device, pad_fraction=0.0)
    y, norm = _run(inputs, backend, return_update_norm=True)
    ref, _, ref_norm = _reference(inputs)
    assert y.shape == (n, 5) and norm.shape == (n,)
    assert_close(y, ref, torch.float32)
    inputs = _case(9, 6, 5, device=device, pad_fraction=1.1)
    y, norm = _run(inputs, backend, return_update_norm=True)
    assert torch.equal(norm, torch.zeros_like(norm))
    assert_close(y, F.linear(inputs["x"], inputs["weight"], inputs["bias"]), torch.float32)


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_empty_expert_groups_and_absent_modality(backend, top_k, device):
    inputs = _case(33, 12, 10, n_modalities=4, n_experts=6, top_k=top_k, device=device, unused_experts=(0, 3, 5))
    inputs["modality"][inputs["modality"] == 2] = 1
    y, norm = _run(inputs, backend, return_update_norm=True)
    ref, base, ref_norm = _reference(inputs)
    assert_close(y.double().cpu() - base, ref - base, torch.float32, what="update")
    assert_close(norm, ref_norm, torch.float32, what="update norm")


def test_torch_backend_layouts_give_the_same_norms_and_gradients(monkeypatch):
    """In place, sorted and chunked groupings of the PyTorch backend agree with the reference."""
    from mosear_fast.kernels.mose import torch_routing

    inputs = _case(40, 10, 8, rank=4, top_k=2, pad_fraction=0.25, seed=7)
    ref_leaves = {n: inputs[n].double().requires_grad_(True) for n in ("x", "gate", "A", "B")}
    ref, _, ref_norm = _reference(inputs, ref_leaves)
    ref.sum().backward()
    for in_place, chunk in ((True, None), (False, None), (False, 1)):
        monkeypatch.setattr(torch_routing, "keeps_in_place", lambda *_, keep=in_place: keep)
        if chunk is not None:
            monkeypatch.setattr(torch_routing, "CHUNK_BYTES", chunk)
        leaves = {n: inputs[n].clone().requires_grad_(True) for n in ("x", "gate", "A", "B")}
        y, norm = _run(dict(inputs, **leaves), "torch", return_update_norm=True)
        y.sum().backward()
        assert_close(y, ref, torch.float32)
        assert_close(norm, ref_norm, torch.float32, what="update norm")
        for n, leaf in leaves.items():
            assert_close(leaf.grad, ref_leaves[n].grad, torch.float32, what=f"grad {n} (in_place={in_place})")


@pytest.mark.parametrize("name,override", [
    ("weight", dict(weight=torch.randn(5, 7))),
    ("weight", dict(weight=torch.randn(5, 6).double())),
    ("weight", dict(weight=[[1.0]])),
    ("bias", dict(bias=torch.randn(4))),
    ("bias", dict(bias=torch.randn(5).half())),
    ("return_update_norm", dict(return_update_norm=1)),
    ("scale", dict(scale=torch.rand(3, requires_grad=True))),
    ("modality", dict(modality=torch.full((8,), 3))),
    ("x", dict(x=torch.randn(8, 6, 1))),
])
def test_bad_input_names_the_argument(name, override):
    inputs = _case(8, 6, 5, rank=4, top_k=2)
    options = {"return_update_norm": override.pop("return_update_norm")} if "return_update_norm" in override else {}
    inputs.update(override)
    with pytest.raises((ValueError, TypeError), match=name):
        _run(inputs, "torch", **options)
