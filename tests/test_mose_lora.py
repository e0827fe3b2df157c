"""mose_lora on every backend against the naive float64 reference (forward and gradients)."""

import pytest
import torch

from mosear_fast import mose_lora
from mosear_fast.kernels.mose import mose_lora_reference
from mosear_fast.tolerances import assert_close

from .cases import make_mose_inputs
from .conftest import MOSE_BACKENDS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(inputs, backend, **kw):
    return mose_lora(inputs["x"], inputs["modality"], inputs["expert"], inputs["gate"], inputs["A"],
                     inputs["B"], inputs["scale"], inputs["out"], backend=backend, **kw)


def _reference(inputs):
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return mose_lora_reference(cpu["x"], cpu["modality"], cpu["expert"], cpu["gate"], cpu["A"], cpu["B"],
                               cpu["scale"], cpu["out"])


def _check_update(y, inputs, dtype):
    """Compares the update y - out (not y, which would hide a wrong update)."""
    ref = _reference(inputs)
    base = inputs["out"].double().cpu() if inputs["out"] is not None else torch.zeros_like(ref)
    assert y.dtype == (inputs["out"].dtype if inputs["out"] is not None else inputs["x"].dtype)
    assert_close(y.double().cpu() - base, ref - base, dtype, what="update")


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("shape", [(37, 19, 23, 8), (64, 32, 48, 16), (5, 7, 3, 4)])
def test_forward_matches_reference(backend, dtype, top_k, shape, device):
    n, d_in, d_out, r = shape
    inputs = make_mose_inputs(n, d_in, d_out, rank=r, top_k=top_k, dtype=dtype, device=device)
    _check_update(_run(inputs, backend), inputs, dtype)


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_without_out_and_float_scale(backend, dtype, device):
    inputs = make_mose_inputs(29, 16, 24, rank=4, top_k=2, dtype=dtype, device=device, with_out=False,
                              tensor_scale=False)
    _check_update(_run(inputs, backend), inputs, dtype)


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unadapted_rows_equal_out_exactly(backend, dtype, device):
    inputs = make_mose_inputs(40, 16, 20, top_k=2, dtype=dtype, device=device, pad_fraction=0.5)
    y = _run(inputs, backend)
    skip = inputs["modality"] == -1
    assert skip.any() and (~skip).any()
    assert torch.equal(y[skip], inputs["out"][skip])
    assert not torch.equal(y[~skip], inputs["out"][~skip])


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
def test_all_rows_unadapted(backend, device):
    inputs = make_mose_inputs(9, 8, 8, device=device, pad_fraction=1.1)
    assert torch.equal(_run(inputs, backend), inputs["out"])


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_empty_expert_groups_and_absent_modality(backend, top_k, device):
    inputs = make_mose_inputs(33, 12, 10, n_modalities=4, n_experts=6, top_k=top_k, device=device,
                              unused_experts=(0, 3, 5))
    inputs["modality"][inputs["modality"] == 2] = 1  # modality 2 absent
    _check_update(_run(inputs, backend), inputs, torch.float32)


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
@pytest.mark.parametrize("n", [0, 1])
def test_tiny_n(backend, n, device):
    inputs = make_mose_inputs(n, 6, 5, top_k=2, device=device, pad_fraction=0.0)
    y = _run(inputs, backend)
    assert y.shape == (n, 5)
    _check_update(y, inputs, torch.float32)


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
def test_size_one_dims(backend, device):
    inputs = make_mose_inputs(17, 1, 1, n_modalities=1, n_experts=1, rank=1, device=device)
    _check_update(_run(inputs, backend), inputs, torch.float32)


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
def test_inplace_writes_into_out(backend, device):
    inputs = make_mose_inputs(21, 8, 12, top_k=2, device=device)
    out, before = inputs["out"], inputs["out"].double().cpu()
    expected = _reference(inputs)
    y = _run(inputs, backend, inplace=True)
    assert y.data_ptr() == out.data_ptr()
    assert_close(out.double().cpu() - before, expected - before, torch.float32, what="update")


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
def test_out_not_modified_without_inplace(backend, device):
    inputs = make_mose_inputs(21, 8, 12, device=device)
    before = inputs["out"].clone()
    _run(inputs, backend)
    assert torch.equal(inputs["out"], before)


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_gradients_match_float64_reference(backend, dtype, top_k, device):
    inputs = make_mose_inputs(31, 12, 10, rank=8, top_k=top_k, dtype=dtype, device=device)
    names = ["x", "gate", "A", "B", "out"]
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in names}
    y = mose_lora(leaves["x"], inputs["modality"], inputs["expert"], leaves["gate"], leaves["A"], leaves["B"],
                  inputs["scale"], leaves["out"], backend=backend)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    y.backward(dy)

    ref_leaves = {n: inputs[n].detach().cpu().double().requires_grad_(True) for n in names}
    ref = mose_lora_reference(ref_leaves["x"], inputs["modality"].cpu(), inputs["expert"].cpu(),
                              ref_leaves["gate"], ref_leaves["A"], ref_leaves["B"], inputs["scale"].cpu(),
                              ref_leaves["out"])
    ref.backward(dy.double().cpu())
    for n in names:
        assert leaves[n].grad is not None, n
        assert leaves[n].grad.dtype == leaves[n].dtype, n
        assert_close(leaves[n].grad, ref_leaves[n].grad, dtype, what=f"grad {n}")


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
def test_float16_large_inputs_stay_finite(backend, device):
    """x near the float16 maximum with small adapter weights: accumulation must not overflow."""
    inputs = make_mose_inputs(24, 64, 16, rank=8, dtype=torch.float16, device=device, weight_std=1e-4)
    inputs["x"] = (torch.rand(inputs["x"].shape) * 2 - 1).mul(6e4).to(torch.float16).to(device)
    inputs["B"] = (torch.randn(inputs["B"].shape) * 0.3).to(torch.float16).to(device)  # update ~ out
    y = _run(inputs, backend)
    assert torch.isfinite(y).all()
    _check_update(y, inputs, torch.float16)


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
def test_gate_and_scale_any_float_dtype(backend, device):
    inputs = make_mose_inputs(19, 8, 8, top_k=2, dtype=torch.bfloat16, device=device)
    inputs["gate"] = inputs["gate"].double()
    inputs["scale"] = inputs["scale"].half()
    _check_update(_run(inputs, backend), inputs, torch.bfloat16)


@pytest.mark.parametrize("gather_max_pairs", [0, 10_000])
@pytest.mark.parametrize("top_k", [1, 2])
def test_torch_backend_gathered_and_grouped_paths(gather_max_pairs, top_k, monkeypatch):
    """The PyTorch backend gathers each token's experts for few tokens (decode) and groups tokens
    otherwise: both paths match the reference, forward and gradients, with padding rows exact."""
    from mosear_fast.kernels.mose import torch_backend

    monkeypatch.setattr(torch_backend, "GATHER_MAX_PAIRS", gather_max_pairs)
    inputs = make_mose_inputs(13, 10, 7, rank=4, top_k=top_k, pad_fraction=0.3, seed=3)
    inputs["expert"][inputs["modality"] == -1] = 99  # never read for rows without an adapter
    names = ["x", "gate", "A", "B", "out"]
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in names}
    y = mose_lora(leaves["x"], inputs["modality"], inputs["expert"], leaves["gate"], leaves["A"], leaves["B"],
                  inputs["scale"], leaves["out"], backend="torch")
    skip = inputs["modality"] == -1
    assert skip.any() and torch.equal(y[skip], inputs["out"][skip])
    y.backward(torch.ones_like(y))
    inputs["expert"][skip] = 0
    ref_leaves = {n: inputs[n].detach().double().requires_grad_(True) for n in names}
    ref = mose_lora_reference(ref_leaves["x"], inputs["modality"], inputs["expert"], ref_leaves["gate"],
                              ref_leaves["A"], ref_leaves["B"], inputs["scale"], ref_leaves["out"])
    ref.backward(torch.ones_like(ref))
    assert_close(y.double() - inputs["out"].double(), ref - inputs["out"].double(), torch.float32, what="update")
    for n in names:
        assert_close(leaves[n].grad, ref_leaves[n].grad, torch.float32, what=f"grad {n}")
