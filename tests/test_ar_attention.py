"""ar_attention on every backend against the naive float64 reference and against SDPA."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from mosear_fast import ar_attention
from mosear_fast.kernels.ar_attention import ar_attention_reference
from mosear_fast.tolerances import assert_close, rel_error, tolerance

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


# --------------------------------------------------------------------------------------------
# DESIGN 2.2b: sliding window, softcap, balancing by contribution, per-head targets
# --------------------------------------------------------------------------------------------

OPTION_SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D)
    (2, 4, 2, 13, 13, 8),    # prefill, GQA
    (2, 4, 1, 1, 21, 8),     # decode, multi-query
    (1, 2, 2, 5, 17, 12),    # chunked prefill with a KV cache (Lq < Lk)
    (1, 2, 1, 7, 4, 8),      # Lq > Lk
]
PER_HEAD = "per-head"  # replaced by a random (Hq, |S|) tensor of targets
OPTIONS = {
    "window": dict(window=4),
    "window1": dict(window=1),  # each query sees only its own position
    "softcap": dict(softcap=0.8, scale=1.0),  # scores of ~N(0, 8): tanh saturates
    "contribution": dict(balance_by="contribution"),
    "contribution3": dict(balance_by="contribution", balance=(0, 1, 2), target=(1.0, 2.0, 3.0), threshold=0.05),
    "per_head": dict(target=PER_HEAD),
    "all": dict(window=5, softcap=1.5, balance_by="contribution", target=PER_HEAD, modality_bias=(0.2, -0.4, 0.3)),
}


def _options(name, n_q_heads, n_balance=2):
    kw = dict(OPTIONS[name])
    if kw.get("target") is PER_HEAD:
        kw["target"] = torch.rand(n_q_heads, n_balance, generator=torch.Generator().manual_seed(n_q_heads)) + 0.1
    return kw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", OPTION_SHAPES)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_options_match_reference(option, shape, dtype):
    inputs = make_ar_inputs(*shape, dtype=dtype, layout="random", seed=11)
    _check(inputs, "torch", dtype, strength=0.7, **_options(option, shape[1]))


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_options_with_left_padding_and_query_mask(option):
    inputs = make_ar_inputs(2, 4, 2, 15, 15, 8, layout="av", left_pad=3, seed=2)
    query_mask = torch.rand(2, 15, generator=torch.Generator().manual_seed(3)) < 0.6
    o, _ = _check(inputs, "torch", torch.float32, strength=0.9, query_mask=query_mask, **_options(option, 4))
    assert torch.equal(o[:, :, :3], torch.zeros_like(o[:, :, :3]))  # only padding visible: zeros


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4, 2, 7, 7, 8), (2, 2, 1, 1, 9, 8)])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option_gradients_match_float64_reference(option, shape, dtype):
    inputs = make_ar_inputs(*shape, dtype=dtype, layout="random", seed=7)
    kw = dict(num_modalities=3, strength=0.7, **_options(option, shape[1]))
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in "qkv"}
    o = ar_attention(leaves["q"], leaves["k"], leaves["v"], inputs["key_modality"], backend="torch", chunk_size=3,
                     **kw)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o)
    o.backward(do)
    ref_leaves = {n: inputs[n].detach().double().requires_grad_(True) for n in "qkv"}
    ref_o, _ = ar_attention_reference(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"], inputs["key_modality"], **kw)
    ref_o.backward(do.double())
    for n in "qkv":
        assert leaves[n].grad is not None and leaves[n].grad.dtype == dtype
        assert_close(leaves[n].grad, ref_leaves[n].grad, dtype, what=f"grad {n}")


@pytest.mark.parametrize("option", ["window", "softcap", "contribution"])
def test_reference_gradients_are_the_true_derivative(option):
    """The float64 oracle itself against finite differences (gradcheck), option by option."""
    inputs = make_ar_inputs(1, 2, 1, 4, 6, 4, layout="random", seed=5)
    tensors = [inputs[n].double().requires_grad_(True) for n in "qkv"]
    kw = dict(num_modalities=3, strength=0.6, **_options(option, 2))
    assert torch.autograd.gradcheck(
        lambda q, k, v: ar_attention_reference(q, k, v, inputs["key_modality"], **kw)[0], tensors)


def _window_mask(key_modality, len_q, window):
    """(B, 1, Lq, Lk) bool: keys with 0 <= pos_i - j < window (bottom-right), padding excluded."""
    len_k = key_modality.shape[1]
    distance = (torch.arange(len_q)[:, None] + len_k - len_q) - torch.arange(len_k)[None, :]
    return (key_modality >= 0)[:, None, None, :] & (distance >= 0) & (distance < window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 3, 8, 64])
@pytest.mark.parametrize("shape", OPTION_SHAPES[:3])
def test_window_at_strength_zero_is_sdpa_with_a_sliding_window_mask(shape, window, dtype):
    inputs = make_ar_inputs(*shape, dtype=dtype, layout="random", seed=4)
    o, _ = _run(inputs, "torch", strength=0.0, window=window)
    q, k, v = (inputs[n].double() for n in "qkv")
    visible = _window_mask(inputs["key_modality"], shape[3], window)
    additive = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, -float("inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, enable_gqa=True)
    expected = torch.where(visible.any(-1, keepdim=True), expected, torch.zeros_like(expected))
    assert_close(o, expected, dtype)


def test_window_skips_keys_outside_it():
    """Decode with a window: keys outside the window are never read (NaN there cannot leak in, which
    it would through a masked product with v), and the output equals attention over the window alone."""
    inputs = make_ar_inputs(2, 4, 2, 1, 20, 8, layout="random", seed=6)
    inputs["key_modality"][:, -4:] = torch.tensor([1, 2, 0, 2])
    poisoned = dict(inputs)
    for n in "kv":
        poisoned[n] = inputs[n].clone()
        poisoned[n][:, :, :16] = float("nan")
    o, masses = _run(poisoned, "torch", strength=0.8, window=4)
    tail = {n: inputs[n][:, :, 16:] for n in "qkv" if n != "q"}
    expected, expected_m = _run(dict(q=inputs["q"], key_modality=inputs["key_modality"][:, 16:], **tail), "torch",
                                strength=0.8)
    assert torch.isfinite(o).all()
    assert_close(o, expected, torch.float32)
    assert_close(masses, expected_m, torch.float32, what="masses")


def test_window_with_small_chunks_matches_reference():
    """Query chunks that each read a different slice of keys (k_start > 0), with gradients."""
    inputs = make_ar_inputs(1, 4, 2, 23, 30, 8, layout="random", seed=8)
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in "qkv"}
    kw = dict(num_modalities=3, strength=0.8, window=6)
    o, masses = ar_attention(leaves["q"], leaves["k"], leaves["v"], inputs["key_modality"], backend="torch",
                             chunk_size=4, return_masses=True, **kw)
    o.backward(torch.ones_like(o))
    ref = {n: inputs[n].detach().double().requires_grad_(True) for n in "qkv"}
    ref_o, ref_m = ar_attention_reference(ref["q"], ref["k"], ref["v"], inputs["key_modality"], **kw)
    ref_o.backward(torch.ones_like(ref_o))
    assert_close(o, ref_o, torch.float32)
    assert_close(masses, ref_m, torch.float32, what="masses")
    for n in "qkv":
        assert_close(leaves[n].grad, ref[n].grad, torch.float32, what=f"grad {n}")


class _Gemma2Module(torch.nn.Module):
    """What transformers' Gemma2 eager attention reads from its module."""

    def __init__(self, head_dim, groups):
        super().__init__()
        self.head_dim, self.num_key_value_groups = head_dim, groups
        self.eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.5, 5.0, 30.0])
def test_softcap_at_strength_zero_is_gemma2_eager_attention(softcap, dtype):
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    inputs = make_ar_inputs(2, 4, 2, 6, 11, 16, dtype=dtype, layout="random", seed=9, score_scale=30.0)
    o, _ = _run(inputs, "torch", strength=0.0, softcap=softcap, window=7, scale=0.3)
    q, k, v = (inputs[n].double() for n in "qkv")
    visible = _window_mask(inputs["key_modality"], 6, 7)
    additive = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, -float("inf"))
    expected, _ = gemma2.eager_attention_forward(_Gemma2Module(16, 2), q, k, v, additive, scaling=0.3,
                                                 softcap=softcap)
    expected = expected.transpose(1, 2)  # transformers returns (B, L, H, D)
    expected = torch.where(visible.any(-1, keepdim=True), expected, torch.zeros_like(expected))
    assert_close(o, expected, dtype)
    uncapped, _ = _run(inputs, "torch", strength=0.0, window=7, scale=0.3)
    assert rel_error(uncapped, expected) > 10 * tolerance(dtype)  # the cap matters here: the check can fail


def test_contribution_differs_from_mass_and_keeps_total_mass():
    inputs = make_ar_inputs(1, 4, 2, 12, 12, 8, layout="random", seed=12)
    by_mass, _ = _run(inputs, "torch", strength=1.0)
    by_contribution, _ = _run(inputs, "torch", strength=1.0, balance_by="contribution")
    assert (by_mass - by_contribution).abs().max() > 1e-3


def test_contribution_with_a_zero_norm_modality():
    """Audio values all zero: ||vbar_audio|| = 0, so audio keeps its mass and text/visual are balanced
    by contribution among themselves, exactly as when audio is not in the balance set."""
    inputs = make_ar_inputs(2, 4, 2, 14, 14, 8, layout="av", seed=13)
    audio = (inputs["key_modality"] == 2)[:, None, :, None]
    inputs["v"] = torch.where(audio, torch.zeros_like(inputs["v"]), inputs["v"])
    kw = dict(strength=0.8, balance_by="contribution")
    o, _ = _check(inputs, "torch", torch.float32, balance=(0, 1, 2), target=(1.0, 3.0, 2.0), **kw)
    without_audio, _ = _run(inputs, "torch", balance=(0, 1), target=(1.0, 3.0), **kw)
    assert_close(o, without_audio, torch.float32)
    plain, _ = _run(inputs, "torch", strength=0.0)
    assert (o - plain).abs().max() > 1e-3  # text and visual did move


def test_contribution_with_every_norm_zero_changes_nothing():
    inputs = make_ar_inputs(1, 2, 2, 9, 9, 8, layout="random", seed=14)
    inputs["v"] = torch.where((inputs["key_modality"] > 0)[:, None, :, None], 0.0, inputs["v"])
    o, _ = _check(inputs, "torch", torch.float32, strength=1.0, balance_by="contribution")
    plain, _ = _run(inputs, "torch", strength=0.0)
    assert_close(o, plain, torch.float32)


@pytest.mark.parametrize("balance_by", ["mass", "contribution"])
def test_per_head_targets_equal_a_loop_over_heads(balance_by):
    inputs = make_ar_inputs(2, 6, 2, 10, 12, 8, layout="random", seed=15)
    target = torch.rand(6, 2, generator=torch.Generator().manual_seed(4)) * 5 + 0.05
    o, masses = _run(inputs, "torch", strength=0.9, target=target, balance_by=balance_by)
    for h in range(6):
        kv = h // 3
        head = dict(q=inputs["q"][:, h:h + 1], k=inputs["k"][:, kv:kv + 1], v=inputs["v"][:, kv:kv + 1],
                    key_modality=inputs["key_modality"])
        o_h, m_h = _run(head, "torch", strength=0.9, target=tuple(target[h].tolist()), balance_by=balance_by)
        assert_close(o[:, h:h + 1], o_h, torch.float32, what=f"head {h}")
        assert_close(masses[:, h:h + 1], m_h, torch.float32, what=f"masses of head {h}")


@pytest.mark.parametrize("option", ["window", "softcap", "contribution", "per_head"])
@pytest.mark.parametrize("strength", [0.0, 0.6])
def test_triton_refuses_options_it_does_not_implement_yet(option, strength, device):
    inputs = make_ar_inputs(1, 4, 2, 6, 6, 8, device=device)
    kw = _options(option, 4)
    name = next(iter(kw)) if option != "softcap" else "softcap"
    with pytest.raises(NotImplementedError, match=name):
        _run(inputs, "triton", strength=strength, **kw)


# --------------------------------------------------------------------------------------------
# Issue 17: extreme but valid targets; the threshold tie
# --------------------------------------------------------------------------------------------

EXTREME_TARGETS = [  # (extreme target, an equivalent ordinary one)
    ((1e-40, 1e-40), None),
    ((3e38, 3e38), (1.0, 1.0)),
    ((1e-300, 1e300), (1e-60, 1.0)),  # normalised: (0, 1) in float64 and in float32 alike
    ((1e-30, 3e-30), (1.0, 3.0)),
    (torch.tensor([1e-40, 1e-40], dtype=torch.float64), (2.0, 2.0)),
    (torch.tensor([3e38, 1e38]), (3.0, 1.0)),
]


@pytest.mark.parametrize("backend", AR_BACKENDS)
@pytest.mark.parametrize("case", range(len(EXTREME_TARGETS)))
def test_extreme_targets_give_the_normalised_result_exactly(backend, case, device):
    extreme, ordinary = EXTREME_TARGETS[case]
    inputs = make_ar_inputs(1, 2, 2, 10, 10, 8, device=device, layout="random", seed=16)
    o, masses = _run(inputs, backend, strength=0.8, target=extreme)
    expected, expected_m = _run(inputs, backend, strength=0.8, target=ordinary)
    assert torch.isfinite(o).all()
    assert torch.equal(o, expected) and torch.equal(masses, expected_m)
    plain, _ = _run(inputs, backend, strength=0.0)
    assert not torch.equal(o, plain)


def _tied_inputs(device):
    """One decode query; a visual and an audio key with identical keys: masses exactly 0.5 / 0.5 of
    the balance set. With target (3, 1) the audio share exceeds its target by exactly 0.25."""
    g = torch.Generator().manual_seed(17)
    q = torch.randn(1, 2, 1, 8, generator=g)
    k = torch.randn(1, 2, 4, 8, generator=g)
    k[:, :, 2] = k[:, :, 1]
    v = torch.randn(1, 2, 4, 8, generator=g)
    return dict(q=q.to(device), k=k.to(device), v=v.to(device), key_modality=torch.tensor([[0, 1, 2, 0]]).to(device))


@pytest.mark.parametrize("backend", AR_BACKENDS)
def test_threshold_tie_is_not_exceeded(backend, device):
    inputs = _tied_inputs(device)
    _, masses = _run(inputs, backend, strength=0.0)
    assert torch.equal(masses[..., 1], masses[..., 2])  # the tie is exact
    plain, _ = _run(inputs, backend, strength=0.0)
    at_tie, _ = _run(inputs, backend, strength=1.0, target=(3.0, 1.0), threshold=0.25)
    below_tie, _ = _run(inputs, backend, strength=1.0, target=(3.0, 1.0), threshold=0.2499)
    assert torch.equal(at_tie, plain), "a deviation equal to the threshold does not exceed it: nothing moves"
    assert (below_tie - plain).abs().max() > 1e-3, "a deviation above the threshold moves the masses"


@pytest.mark.parametrize("balance_by", ["mass", "contribution"])
@pytest.mark.parametrize("target", [None, ()])
def test_empty_balance_is_plain_attention(balance_by, target):
    inputs = make_ar_inputs(1, 2, 2, 9, 9, 8, layout="av", seed=18)
    o, _ = _check(inputs, "torch", torch.float32, balance=(), target=target, strength=1.0, balance_by=balance_by)
    plain, _ = _run(inputs, "torch", strength=0.0)
    assert_close(o, plain, torch.float32)
