"""ar_attention on every backend against the naive float64 reference and against SDPA."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from mosear_fast import ar_attention
from mosear_fast.kernels.ar_attention import ar_attention_reference
from mosear_fast.tolerances import assert_close

from .cases import make_ar_inputs
from .conftest import AR_BACKENDS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else t


def _run(inputs, backend, **kw):
    kw.setdefault("num_modalities", 3)
    return ar_attention(inputs["q"], inputs["k"], inputs["v"], inputs["key_modality"], backend=backend,
                        return_masses=True, **kw)


def _check(inputs, backend, dtype, **kw):
    o, masses = _run(inputs, backend, **kw)
    kw.setdefault("num_modalities", 3)
    kw = {k: _cpu(v) for k, v in kw.items()}
    ref_o, ref_m = ar_attention_reference(*(_cpu(inputs[n]) for n in ("q", "k", "v", "key_modality")), **kw)
    assert o.dtype == inputs["q"].dtype and o.shape == ref_o.shape
    assert masses.dtype == torch.float32 and masses.shape == ref_m.shape
    assert_close(o, ref_o, dtype, what="output")
    assert_close(masses, ref_m, dtype, what="masses")
    return o, masses


def _visible_mask(key_modality, len_q, causal):
    """(B, 1, Lq, Lk) bool: what each query may attend to (bottom-right causal, padding excluded)."""
    len_k = key_modality.shape[1]
    mask = (key_modality >= 0)[:, None, None, :].expand(-1, 1, len_q, len_k)
    if causal:
        pos = torch.arange(len_q)[:, None] + len_k - len_q
        mask = mask & (torch.arange(len_k)[None, :] <= pos)
    return mask


def _sdpa64(inputs, *, causal, bias=None):
    q, k, v, mod = (inputs[n].double().cpu() if n != "key_modality" else inputs[n].cpu()
                    for n in ("q", "k", "v", "key_modality"))
    visible = _visible_mask(mod, q.shape[2], causal)
    additive = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, -float("inf"))
    if bias is not None:
        additive = additive + torch.tensor(bias, dtype=torch.float64)[mod.clamp(min=0)][:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, enable_gqa=True)
    has_key = visible.any(-1, keepdim=True)  # [B,1,Lq,1]
    return torch.where(has_key, out, torch.zeros_like(out)), has_key


SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D)
    (2, 4, 4, 13, 13, 8),    # prefill, MHA
    (1, 6, 2, 9, 9, 16),     # prefill, GQA
    (2, 4, 1, 1, 21, 8),     # decode, multi-query
    (1, 2, 2, 5, 17, 12),    # chunked prefill with a KV cache (Lq < Lk)
    (1, 2, 1, 7, 4, 8),      # Lq > Lk: the first 3 queries see nothing
]


@pytest.mark.parametrize("backend", AR_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["random", "av"])
def test_forward_matches_reference(backend, dtype, shape, layout, device):
    inputs = make_ar_inputs(*shape, dtype=dtype, device=device, layout=layout)
    _check(inputs, backend, dtype, strength=0.6)


@pytest.mark.parametrize("backend", AR_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_non_causal_and_options(backend, causal, device):
    inputs = make_ar_inputs(2, 4, 2, 11, 11, 8, device=device, n_modalities=4)
    _check(inputs, backend, torch.float32, num_modalities=4, balance=(3, 1, 2), target=(1.0, 2.0, 0.5),
           strength=0.8, causal=causal, scale=0.3, modality_bias=(0.1, -0.5, 0.7, 0.0))


@pytest.mark.parametrize("backend", AR_BACKENDS)
def test_left_padding(backend, device):
    inputs = make_ar_inputs(2, 2, 2, 15, 15, 8, device=device, layout="av", left_pad=4)
    o, masses = _check(inputs, backend, torch.float32)
    # queries whose causal window holds only padding output zeros and report zero masses
    assert torch.equal(o[:, :, :4].cpu(), torch.zeros_like(o[:, :, :4].cpu()))
    assert torch.equal(masses[:, :, :4].cpu(), torch.zeros_like(masses[:, :, :4].cpu()))


@pytest.mark.parametrize("backend", AR_BACKENDS)
def test_balance_modality_absent_for_early_queries(backend, device):
    """Text queries before the visual and audio spans: S_i has < 2 modalities, so nothing moves."""
    inputs = make_ar_inputs(1, 2, 2, 32, 32, 8, device=device, layout="av")
    o, _ = _check(inputs, backend, torch.float32, strength=1.0)
    plain, _ = _sdpa64(inputs, causal=True)
    first_audio = int((inputs["key_modality"][0].cpu() == 2).nonzero()[0])
    assert_close(o[:, :, :first_audio], plain[:, :, :first_audio], torch.float32)
    assert (o[:, :, first_audio:].double().cpu() - plain[:, :, first_audio:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", AR_BACKENDS)
def test_threshold_decides_per_query(backend, device):
    inputs = make_ar_inputs(1, 4, 4, 24, 24, 8, device=device, layout="random", seed=3)
    _, masses = _run(inputs, backend, strength=0.0)
    shares = masses[..., 1:3] / masses[..., 1:3].sum(-1, keepdim=True)
    deviation = (shares - 0.5).amax(-1).cpu()
    # halfway between two neighbouring deviations: no query sits on the threshold (a float tie)
    levels = deviation[torch.isfinite(deviation)].unique()
    threshold = float(levels[len(levels) // 2 - 1] + levels[len(levels) // 2]) / 2
    o, _ = _check(inputs, backend, torch.float32, strength=1.0, threshold=threshold)
    plain, _ = _sdpa64(inputs, causal=True)
    moved = (o.double().cpu() - plain).abs().amax(-1) > 1e-6
    below = deviation <= threshold
    assert (moved & ~below).any(), "some query above the threshold must be reallocated"
    assert not (moved & below).any(), "queries at or below the threshold must not change"


@pytest.mark.parametrize("backend", AR_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_strength_zero_is_sdpa(backend, dtype, shape, device):
    inputs = make_ar_inputs(*shape, dtype=dtype, device=device, layout="random")
    o, _ = _run(inputs, backend, strength=0.0)
    expected, _ = _sdpa64(inputs, causal=True)
    assert_close(o, expected, dtype)


@pytest.mark.parametrize("backend", AR_BACKENDS)
def test_strength_zero_is_sdpa_causal_lower_right(backend, device):
    """No padding: compare with torch's own bottom-right causal bias (Lq < Lk)."""
    inputs = make_ar_inputs(2, 4, 4, 6, 19, 16, device=device)
    inputs["key_modality"] = inputs["key_modality"].clamp(min=0)
    o, _ = _run(inputs, backend, strength=0.0)
    q, k, v = (inputs[n].double().cpu() for n in "qkv")
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(6, 19))
    assert_close(o, expected, torch.float32)


@pytest.mark.parametrize("backend", AR_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_modality_bias_is_sdpa_with_additive_bias(backend, causal, device):
    inputs = make_ar_inputs(2, 4, 2, 10, 10, 8, device=device)
    bias = (0.3, -1.2, 0.8)
    o, masses = _run(inputs, backend, strength=0.0, modality_bias=bias, causal=causal)
    expected, _ = _sdpa64(inputs, causal=causal, bias=bias)
    assert_close(o, expected, torch.float32)


@pytest.mark.parametrize("backend", AR_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masses_sum_to_one_per_visible_query(backend, dtype, device):
    inputs = make_ar_inputs(2, 4, 2, 12, 12, 8, dtype=dtype, device=device, layout="random")
    _, masses = _run(inputs, backend)
    has_key = _visible_mask(inputs["key_modality"].cpu(), 12, True).any(-1)  # [B,1,Lq]
    total = masses.sum(-1).cpu()
    assert torch.allclose(total[has_key.expand_as(total)], torch.ones(()), atol=1e-5)
    assert torch.equal(total[~has_key.expand_as(total)], torch.zeros_like(total[~has_key.expand_as(total)]))


@pytest.mark.parametrize("backend", AR_BACKENDS)
def test_query_mask_selects_reallocated_queries(backend, device):
    inputs = make_ar_inputs(2, 2, 2, 16, 16, 8, device=device, layout="random", seed=5)
    query_mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) < 0.5
    o, _ = _check(inputs, backend, torch.float32, strength=0.9, query_mask=query_mask.to(device))
    plain, _ = _sdpa64(inputs, causal=True)
    unselected = ~query_mask[:, None, :].expand(-1, 2, -1)
    assert_close(o.cpu()[unselected], plain[unselected], torch.float32)


@pytest.mark.parametrize("backend", AR_BACKENDS)
def test_underflowing_balance_modality_still_receives_mass(backend, device):
    """A bias of -1e4 makes the visual mass exactly 0; reallocation still gives it its share."""
    inputs = make_ar_inputs(1, 2, 2, 12, 12, 8, device=device, layout="random", seed=1)
    o, masses = _check(inputs, backend, torch.float32, strength=0.5, modality_bias=(0.0, -1e4, 0.0))
    mod = inputs["key_modality"].cpu()
    sees = [_visible_mask(torch.where(mod == m, mod, -1), 12, True).any(-1) for m in range(3)]  # [B,1,Lq]
    mixed = (sees[1] & (sees[0] | sees[2])).expand(-1, 2, -1)
    assert mixed.any()
    assert (masses[..., 1].cpu()[mixed] == 0).all()
    unmoved, _ = _run(inputs, backend, strength=0.0, modality_bias=(0.0, -1e4, 0.0))
    receives = (sees[1] & sees[2]).expand(-1, 2, -1)
    assert ((o - unmoved).abs().amax(-1).cpu()[receives] > 1e-3).all()


@pytest.mark.parametrize("backend", AR_BACKENDS)
def test_extreme_scores_float32(backend, device):
    """Scores around +-1e4 from exactly representable inputs (integers), so the check isolates the
    softmax's numerical stability from input rounding."""
    g = torch.Generator().manual_seed(4)
    inputs = make_ar_inputs(1, 2, 2, 10, 10, 8, device=device)
    inputs["q"] = torch.randint(-60, 61, (1, 2, 10, 8), generator=g).float().to(device)
    inputs["k"] = torch.randint(-60, 61, (1, 2, 10, 8), generator=g).float().to(device)
    o, masses = _check(inputs, backend, torch.float32, scale=1.0, strength=0.7)
    assert torch.isfinite(o).all() and torch.isfinite(masses).all()


@pytest.mark.parametrize("backend", AR_BACKENDS)
def test_float16_values_near_maximum(backend, device):
    inputs = make_ar_inputs(1, 2, 2, 9, 9, 8, dtype=torch.float16, device=device, score_scale=4.0)
    inputs["v"] = (torch.rand(inputs["v"].shape) * 2 - 1).mul(6.5e4).half().to(device)
    o, _ = _check(inputs, backend, torch.float16, strength=0.5)
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("backend", AR_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4, 2, 7, 7, 8), (2, 2, 1, 1, 9, 8)])
def test_gradients_match_float64_reference(backend, dtype, shape, device):
    inputs = make_ar_inputs(*shape, dtype=dtype, device=device, layout="random", seed=7)
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in "qkv"}
    kw = dict(num_modalities=3, strength=0.7, modality_bias=(0.2, -0.3, 0.1))
    o = ar_attention(leaves["q"], leaves["k"], leaves["v"], inputs["key_modality"], backend=backend, **kw)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o)
    o.backward(do)
    ref_leaves = {n: inputs[n].detach().cpu().double().requires_grad_(True) for n in "qkv"}
    ref_o, _ = ar_attention_reference(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"],
                                      inputs["key_modality"].cpu(), **kw)
    ref_o.backward(do.double().cpu())
    for n in "qkv":
        assert leaves[n].grad is not None and leaves[n].grad.dtype == dtype
        assert_close(leaves[n].grad, ref_leaves[n].grad, dtype, what=f"grad {n}")


@pytest.mark.parametrize("backend", AR_BACKENDS)
def test_empty_query_length(backend, device):
    inputs = make_ar_inputs(1, 2, 2, 0, 5, 8, device=device)
    o, masses = _run(inputs, backend)
    assert o.shape == (1, 2, 0, 8) and masses.shape == (1, 2, 0, 3)


@pytest.mark.parametrize("causal", [True, False])
def test_torch_backend_small_chunks_forward_and_gradients(causal):
    """The PyTorch backend's query chunks (and their checkpointing) do not change the result."""
    inputs = make_ar_inputs(2, 4, 2, 11, 13, 8, layout="random", seed=9)
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in "qkv"}
    kw = dict(num_modalities=3, strength=0.8, causal=causal)
    o, masses = ar_attention(leaves["q"], leaves["k"], leaves["v"], inputs["key_modality"], backend="torch",
                             chunk_size=3, return_masses=True, **kw)
    o.backward(torch.ones_like(o))
    ref_leaves = {n: inputs[n].detach().double().requires_grad_(True) for n in "qkv"}
    ref_o, ref_m = ar_attention_reference(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"],
                                          inputs["key_modality"], **kw)
    ref_o.backward(torch.ones_like(ref_o))
    assert_close(o, ref_o, torch.float32)
    assert_close(masses, ref_m, torch.float32, what="masses")
    for n in "qkv":
        assert_close(leaves[n].grad, ref_leaves[n].grad, torch.float32, what=f"grad {n}")
