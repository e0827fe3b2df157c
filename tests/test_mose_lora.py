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


def _force_layout(monkeypatch, layout):
    """Runs the PyTorch backend's groupings in one layout: rows in place, sorted, or sorted in chunks
    of one or two rows (CHUNK_BYTES smaller than a row)."""
    from mosear_fast.kernels.mose import torch_routing

    if layout == "in_place":
        monkeypatch.setattr(torch_routing, "keeps_in_place", lambda *_: True)
    elif layout in ("sorted", "chunked"):
        monkeypatch.setattr(torch_routing, "keeps_in_place", lambda *_: False)
        if layout == "chunked":
            monkeypatch.setattr(torch_routing, "CHUNK_BYTES", 1)


def _check_forward_and_gradients(inputs, dtype=torch.float32):
    """mose_lora (torch backend) against the float64 reference: update, rows without adapter exactly
    out, gradients of x, gate, A, B and out."""
    names = ["x", "gate", "A", "B", "out"]
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in names}
    y = mose_lora(leaves["x"], inputs["modality"], inputs["expert"], leaves["gate"], leaves["A"], leaves["B"],
                  inputs["scale"], leaves["out"], backend="torch")
    skip = inputs["modality"] == -1
    assert torch.equal(y[skip], inputs["out"][skip])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    y.backward(dy)
    expert = torch.where(skip[:, None], 0, inputs["expert"])  # the reference reads every row's ids
    ref_leaves = {n: inputs[n].detach().double().requires_grad_(True) for n in names}
    ref = mose_lora_reference(ref_leaves["x"], inputs["modality"], expert, ref_leaves["gate"], ref_leaves["A"],
                              ref_leaves["B"], inputs["scale"], ref_leaves["out"])
    ref.backward(dy.double())
    base = inputs["out"].double()
    assert_close(y.double() - base, ref.detach() - base, dtype, what="update")
    for n in names:
        assert_close(leaves[n].grad, ref_leaves[n].grad, dtype, what=f"grad {n}")


@pytest.mark.parametrize("layout", ["auto", "in_place", "sorted", "chunked"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_torch_backend_layouts(layout, top_k, monkeypatch):
    """Every grouping layout of the PyTorch backend matches the reference, forward and gradients,
    with padding rows (whose expert ids are out of range) exactly out."""
    _force_layout(monkeypatch, layout)
    inputs = make_mose_inputs(29, 10, 7, rank=4, top_k=top_k, pad_fraction=0.3, seed=3)
    inputs["expert"][inputs["modality"] == -1] = 99  # never read for rows without an adapter
    _check_forward_and_gradients(inputs)


@pytest.mark.parametrize("routing", ["token", "sequence"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_torch_backend_av_prompt(routing, top_k):
    """An audio-visual prompt (text, visual span, audio span, text, with left padding): modality runs
    stay in place; with sequence routing (each span shares its experts) the expert runs too."""
    from mosear_fast.kernels.mose.torch_routing import prepare_torch_routing

    from .cases import av_layout

    n = 160
    inputs = make_mose_inputs(n, 12, 9, rank=4, top_k=top_k, pad_fraction=0.0, seed=5)
    inputs["modality"] = av_layout(n, left_pad=7)
    if routing == "sequence":
        span = torch.cumsum(torch.cat([torch.ones(1, dtype=torch.long),
                                       (inputs["modality"][1:] != inputs["modality"][:-1]).long()]), 0)
        inputs["expert"] = inputs["expert"][span]  # one expert choice per span, like sequence routing
    plan = prepare_torch_routing(inputs["modality"], inputs["expert"], inputs["gate"], inputs["scale"], 3, 4,
                                 row_bytes=4 * 12)
    assert plan.tokens.in_place
    assert all(choice.in_place for choice in plan.choices) == (routing == "sequence")
    _check_forward_and_gradients(inputs)


@pytest.mark.parametrize("n", [6, 40])
@pytest.mark.parametrize("top_k", [1, 2])
def test_nan_in_padding_rows_reaches_no_gradient(n, top_k):
    """Issue 17 item 2: NaN in the x and gate of rows without adapter (a decode step, N*k <= 16, and a
    larger batch) leaves every output row but theirs and every gradient of A, B, gate finite and
    right; those rows' own dx is 0 (their x is not used)."""
    inputs = make_mose_inputs(n, 8, 6, rank=4, top_k=top_k, pad_fraction=0.0, seed=11)
    pad = torch.arange(n) % 3 == 1
    inputs["modality"][pad] = -1
    clean = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    inputs["x"][pad] = float("nan")
    inputs["gate"][pad] = float("nan")
    names = ["x", "gate", "A", "B"]
    leaves = {k: inputs[k].clone().requires_grad_(True) for k in names}
    y = mose_lora(leaves["x"], inputs["modality"], inputs["expert"], leaves["gate"], leaves["A"], leaves["B"],
                  inputs["scale"], inputs["out"], backend="torch")
    y.backward(torch.ones_like(y))
    assert torch.equal(y[pad], inputs["out"][pad])
    ref_leaves = {k: clean[k].double().requires_grad_(True) for k in names}
    ref = mose_lora_reference(ref_leaves["x"], clean["modality"], clean["expert"], ref_leaves["gate"], ref_leaves["A"],
                              ref_leaves["B"], clean["scale"], clean["out"])
    ref.backward(torch.ones_like(ref))
    assert_close(y[~pad], ref[~pad], torch.float32)
    assert torch.equal(leaves["x"].grad[pad], torch.zeros_like(leaves["x"].grad[pad]))
    for k in names:
        assert_close(leaves[k].grad, ref_leaves[k].grad, torch.float32, what=f"grad {k}")


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
def test_float16_down_projection_above_the_float16_range(backend, device):
    """Issue 17 item 9: h = A x beyond 65504 (x near the float16 maximum) while s g h and the update
    are within range: the result is finite and right on both backends (h is kept in float32)."""
    inputs = make_mose_inputs(24, 64, 16, rank=8, dtype=torch.float16, device=device, seed=4)
    inputs["x"] = (torch.rand(inputs["x"].shape) * 2 - 1).mul(6e4).to(torch.float16).to(device)
    inputs["A"] = (torch.randn(inputs["A"].shape) * 0.3).to(torch.float16).to(device)
    inputs["B"] = (torch.randn(inputs["B"].shape) * 0.01).to(torch.float16).to(device)
    inputs["scale"] = torch.full((3,), 0.05, device=device)
    h = torch.einsum("nd,nrd->nr", inputs["x"].double().cpu(), inputs["A"].double().cpu()[inputs["modality"].clamp(0)])
    assert h.abs().max() > 65504 > 0.05 * h.abs().max()  # the case of the issue: an fp16 h would overflow
    y = _run(inputs, backend)
    assert torch.isfinite(y).all()
    _check_update(y, inputs, torch.float16)


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
def test_inplace_into_an_expanded_out_is_refused(backend, device):
    """Issue 17 item 8: inplace=True into an `out` whose rows share memory (an expanded tensor) is a
    ValueError naming out, on both backends, and nothing is written."""
    inputs = make_mose_inputs(12, 8, 6, device=device)
    row = torch.randn(1, 6, device=device)
    inputs["out"] = row.expand(12, 6)
    with pytest.raises(ValueError, match="out"):
        _run(inputs, backend, inplace=True)
    assert torch.equal(inputs["out"], row.expand(12, 6))
    inputs["out"] = torch.randn(6, 12, device=device).t()  # strided but not overlapping: accepted
    before = inputs["out"].clone()
    y = _run(inputs, backend, inplace=True)
    assert y.data_ptr() == inputs["out"].data_ptr()
    _check_update(y, dict(inputs, out=before), torch.float32)


@pytest.mark.parametrize("backend", MOSE_BACKENDS)
def test_scale_that_requires_grad_is_refused(backend, device):
    """Issue 17 item 10: scale is not differentiated by either backend (s * w_m, the dynamic weights
    are buffers), so a scale tensor that requires grad is refused, naming scale; without grad mode
    it is accepted."""
    inputs = make_mose_inputs(10, 8, 6, device=device)
    inputs["scale"] = inputs["scale"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="scale"):
        _run(inputs, backend)
    with torch.no_grad():
        y = _run(inputs, backend)
    _check_update(y, dict(inputs, scale=inputs["scale"].detach()), torch.float32)
