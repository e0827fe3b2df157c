"""Triton backend of ar_attention: block boundaries, class passes, the causal diagonal, GQA packing,
split-k, 64-bit offsets, edge cases.

On the CPU these run through the Triton interpreter (small shapes, small blocks so that tails and
modality boundaries fall inside key blocks); with CUDA the same tests run compiled. Every check is
against the float64 reference with the tolerance table (relative Frobenius error per dtype).
"""

import pytest
import torch

from mosear_fast import ar_attention
from mosear_fast.kernels.ar_attention import ar_attention_reference
from mosear_fast.kernels.ar_attention.function import ar_attention_triton
from mosear_fast.kernels.ar_attention.launch import launch_plan
from mosear_fast.tolerances import assert_close

from .cases import av_layout, make_ar_inputs
from .triton_compile import compile_launches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMALL = dict(block_m=16, block_n=16)  # the smallest blocks tl.dot allows: many blocks on tiny shapes


def _run(inputs, **kw):
    kw.setdefault("num_modalities", 3)
    return ar_attention(inputs["q"], inputs["k"], inputs["v"], inputs["key_modality"], backend="triton",
                        return_masses=True, **kw)


def _reference(inputs, **kw):
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()
          if k not in ("block_m", "block_n", "num_splits")}
    kw.setdefault("num_modalities", 3)
    return ar_attention_reference(*(inputs[n].cpu() for n in ("q", "k", "v", "key_modality")), **kw)


def _check(inputs, dtype, **kw):
    o, masses = _run(inputs, **kw)
    ref_o, ref_m = _reference(inputs, **kw)
    assert o.dtype == inputs["q"].dtype and o.shape == ref_o.shape
    assert masses.dtype == torch.float32 and masses.shape == ref_m.shape
    assert_close(o, ref_o, dtype, what="output")
    assert_close(masses, ref_m, dtype, what="masses")
    return o, masses


def _segments(spec, device):
    """(1, L) modality ids from [(modality, count), ...]."""
    ids = torch.cat([torch.full((n,), m, dtype=torch.long) for m, n in spec])
    return ids[None].to(device)


# --------------------------------------------------------------------------------------------
# tiling: tails, boundaries inside key blocks, blocks of one modality
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["random", "av"])
def test_odd_lengths_and_boundaries_inside_blocks(dtype, layout, device):
    # 37 keys: 3 key blocks of 16 with a tail; the av layout puts boundaries at 4, 22 and 26.
    inputs = make_ar_inputs(1, 2, 2, 37, 37, 16, dtype=dtype, device=device, layout=layout, seed=1)
    _check(inputs, dtype, strength=0.6, **SMALL)


def test_blocks_of_one_modality(device):
    """Segments aligned to the 16-key blocks (each block updates one slot only) and misaligned."""
    for spec in ([(0, 16), (1, 32), (2, 16), (0, 16)], [(0, 5), (1, 30), (2, 17), (1, 3), (0, 9)]):
        ids = _segments(spec, device)
        inputs = make_ar_inputs(1, 2, 1, ids.shape[1], ids.shape[1], 16, device=device, seed=2)
        inputs["key_modality"] = ids
        _check(inputs, torch.float32, strength=0.7, **SMALL)
        _check(inputs, torch.float32, strength=0.7, causal=False, **SMALL)


def _plan(inputs, n_classes=3, **kw):
    q, k = inputs["q"], inputs["k"]
    return launch_plan(q.shape[2], k.shape[2], q.shape[3], batch=q.shape[0], n_q_heads=q.shape[1],
                       n_kv_heads=k.shape[1], n_classes=n_classes, dtype=q.dtype, device=q.device, **kw)


@pytest.mark.parametrize("spec", [
    [(0, 20), (1, 14), (2, 6), (0, 8)],  # early query blocks see text (the rest class) only
    [(2, 10), (0, 17), (1, 21)],  # passes in class order (video, audio, rest): video comes last here
    [(1, 40)],  # one class
    [(2, 9), (1, 30)],  # balance classes only
], ids=["text-av-text", "video-last", "one-class", "balance-only"])
def test_class_passes_and_parked_states(spec, device):
    """Prefill runs one pass per key class and parks all but the last: query blocks that see one
    class only (no parking), a class missing in the middle of the order, all keys of one class."""
    ids = _segments(spec, device)
    inputs = make_ar_inputs(1, 2, 1, ids.shape[1], ids.shape[1], 16, device=device, seed=20)
    inputs["key_modality"] = ids
    plan = _plan(inputs, **SMALL)
    assert plan["mode"] == "prefill" and plan["n_tiles"] > plan["grid"][0]  # programs run several tiles
    _check(inputs, torch.float32, strength=0.8, **SMALL)


@pytest.mark.parametrize("blocks", [dict(block_m=32, block_n=16), dict(block_m=16, block_n=32)])
@pytest.mark.parametrize("lengths", [(37, 37), (21, 50), (30, 12)])
def test_causal_diagonal_blocks(blocks, lengths, device):
    """Causal masking only on the diagonal: a query block over several key blocks and a key block
    over several query blocks, with the diagonal offset (Lq < Lk) or with queries that see no key."""
    len_q, len_k = lengths
    inputs = make_ar_inputs(1, 2, 2, len_q, len_k, 16, device=device, layout="av", seed=21)
    _check(inputs, torch.float32, strength=0.6, **blocks)  # every key block mixed
    # runs of 32 keys per modality: pure key blocks on and off the diagonal (masked by position only)
    inputs["key_modality"] = (torch.arange(len_k, device=device) // 32 % 3)[None]
    _check(inputs, torch.float32, strength=0.6, **blocks)


@pytest.mark.parametrize("len_q", [1, 2, 3])
def test_decode_packs_the_query_heads_of_a_kv_group(len_q, device):
    """Seven query heads per KV head: rows = classes x heads x queries of one block (21 to 63 rows),
    K/V read once per KV head; with padding, a query mask, and key splits."""
    inputs = make_ar_inputs(1, 14, 2, len_q, 45, 16, dtype=torch.float16, device=device, layout="av",
                            left_pad=5, seed=22)
    plan = _plan(inputs, block_n=16)
    assert plan["mode"] == "decode" and plan["block_m"] == (32 if len_q == 1 else 64)
    assert plan["grid"] == (2, 1)  # one program per (batch, KV head)
    query_mask = torch.tensor([[True, False, True][:len_q]], device=device)
    for num_splits in (None, 3):
        _check(inputs, torch.float16, strength=0.7, query_mask=query_mask, block_n=16, num_splits=num_splits)
    _check(inputs, torch.float16, strength=0.7, causal=False, block_n=16, num_splits=2)


def test_split_edge_cases(device):
    """More splits asked than key blocks (capped), splits where a class has no key, and a decode
    without a split (one partial state per class, still merged exactly)."""
    ids = _segments([(0, 3), (1, 30), (2, 4), (0, 3)], device)  # audio in one split only
    inputs = make_ar_inputs(1, 4, 2, 1, 40, 16, device=device, seed=23)
    inputs["key_modality"] = ids
    plan = _plan(inputs, block_n=16, num_splits=10)
    assert plan["num_splits"] == 3  # 40 keys: 3 blocks of 16
    for num_splits in (1, 2, 10):
        _check(inputs, torch.float32, strength=0.9, block_n=16, num_splits=num_splits)
    prefill = make_ar_inputs(1, 2, 1, 24, 40, 16, device=device, seed=24)
    prefill["key_modality"] = ids
    for num_splits in (2, 10):  # the first query block sees no key of the later splits
        _check(prefill, torch.float32, strength=0.9, num_splits=num_splits, **SMALL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_negative_and_zero_scale(scale, dtype, device):
    inputs = make_ar_inputs(1, 2, 1, 20, 20, 16, dtype=dtype, device=device, layout="random", seed=25)
    _check(inputs, dtype, strength=0.5, scale=scale, **SMALL)
    _check(make_ar_inputs(1, 2, 1, 1, 20, 16, dtype=dtype, device=device, layout="random", seed=25), dtype,
           strength=0.5, scale=scale, block_n=16)


def test_offsets_beyond_int32(device):
    """K and V as views with a key stride of 2^28 elements: key 8 sits 2^31 elements past the base,
    so 32-bit offset arithmetic would wrap (and read elsewhere). The view needs 4.3 GB of address
    space but touches only the pages of its keys."""
    head_dim, length, stride = 16, 9, 1 << 28
    try:
        base = torch.empty(stride * (length - 1) + 2 * head_dim, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as err:
        pytest.skip(f"cannot reserve 4.3 GB of address space for the strided view: {err}")
    kv = base.as_strided((1, 1, length, 2 * head_dim), (0, 0, stride, 1))
    g = torch.Generator().manual_seed(26)
    kv.copy_(torch.randn(1, 1, length, 2 * head_dim, generator=g).half())
    k, v = kv[..., :head_dim], kv[..., head_dim:]
    assert (length - 1) * k.stride(2) >= 2 ** 31
    q = torch.randn(1, 2, length, head_dim, generator=g).half().to(device)
    ids = torch.tensor([[0, 1, 1, 2, 0, 1, 2, 2, 0]], device=device)
    inputs = dict(q=q, k=k, v=v, key_modality=ids)
    _check(inputs, torch.float16, strength=0.5, **SMALL)  # prefill
    _check(dict(inputs, q=q[:, :, -2:]), torch.float16, strength=0.5)  # decode


# --------------------------------------------------------------------------------------------
# DESIGN 2.2b in the kernels: sliding window, softcap, contribution balancing, per-head targets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 9])
def test_window_skips_blocks_and_masks_its_edges(window, device):
    """70 keys in 16-key blocks: a 9-key window skips most blocks of a query block, its edges cut
    blocks (masked like the diagonal), on pure and on mixed blocks; prefill, split prefill, decode."""
    ids = (torch.arange(70, device=device) // 32 % 3)[None]  # pure 16-key blocks, two boundaries
    inputs = make_ar_inputs(1, 4, 2, 70, 70, 16, device=device, seed=30)
    inputs["key_modality"] = ids
    for blocks in (dict(block_m=16, block_n=16), dict(block_m=32, block_n=16)):
        _check(inputs, torch.float32, strength=0.7, window=window, **blocks)
    _check(inputs, torch.float32, strength=0.7, window=window, num_splits=3, **SMALL)
    inputs["key_modality"] = av_layout(70, left_pad=6)[None].to(device)  # mixed blocks, padding
    _check(inputs, torch.float32, strength=0.7, window=window, **SMALL)
    decode = dict(inputs, q=inputs["q"][:, :, -3:])
    plan = _plan(decode, window=window, block_n=16, num_splits=2)
    assert plan["mode"] == "decode" and plan["key_start"] == max(0, 70 - 3 - window + 1)
    for num_splits in (1, 2):  # the splits cover the window's keys only
        _check(decode, torch.float32, strength=0.7, window=window, block_n=16, num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_with_bias_and_saturated_scores(dtype, device):
    """Scores of several softcaps (tanh saturated at 0.8), a static bias per modality, a negative
    scale; prefill, split prefill and decode."""
    inputs = make_ar_inputs(1, 4, 2, 21, 37, 16, dtype=dtype, device=device, layout="av", seed=31, score_scale=3.0)
    kw = dict(strength=0.6, modality_bias=(0.3, -0.5, 0.2))
    for softcap, scale in ((0.8, 1.0), (5.0, -0.4), (30.0, 0.25)):
        _check(inputs, dtype, softcap=softcap, scale=scale, **kw, **SMALL)
    _check(inputs, dtype, softcap=5.0, num_splits=2, **kw, **SMALL)
    _check(dict(inputs, q=inputs["q"][:, :, -1:]), dtype, softcap=5.0, block_n=16, **kw)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_contribution_with_parked_merged_and_zero_norm_classes(num_splits, device):
    """||vbar|| per class from the parked states (prefill) and from the merged partial states (split
    prefill, decode); a class whose values are all zero keeps its mass."""
    inputs = make_ar_inputs(2, 4, 2, 30, 40, 16, device=device, layout="av", seed=32)
    kw = dict(strength=0.9, balance_by="contribution", balance=(0, 1, 2), target=(1.0, 3.0, 2.0))
    _check(inputs, torch.float32, num_splits=num_splits, **kw, **SMALL)
    decode = dict(inputs, q=inputs["q"][:, :, -2:])
    _check(decode, torch.float32, num_splits=num_splits, block_n=16, **kw)
    audio = (inputs["key_modality"] == 2)[:, None, :, None]
    silent = dict(inputs, v=torch.where(audio, torch.zeros_like(inputs["v"]), inputs["v"]))
    o, _ = _check(silent, torch.float32, num_splits=num_splits, **kw, **SMALL)
    plain, _ = _run(silent, strength=0.0, num_splits=num_splits, **SMALL)
    assert (o - plain).abs().max() > 1e-3  # text and video still moved


@pytest.mark.parametrize("num_splits", [1, 2])
def test_per_head_targets(num_splits, device):
    """One target row per query head: in the prefill epilogue, in the merge, with GQA packing."""
    g = torch.Generator().manual_seed(33)
    inputs = make_ar_inputs(1, 7, 1, 20, 36, 16, device=device, layout="av", seed=33)
    target = torch.rand(7, 2, generator=g) * 4 + 0.1
    outputs = {}
    for balance_by in ("mass", "contribution"):
        kw = dict(strength=1.0, target=target, balance_by=balance_by, num_splits=num_splits)
        outputs[balance_by], _ = _check(inputs, torch.float32, **kw, **SMALL)
        _check(dict(inputs, q=inputs["q"][:, :, -3:]), torch.float32, block_n=16, **kw)
    uniform, _ = _run(inputs, strength=1.0, num_splits=num_splits, **SMALL)
    assert (outputs["mass"] - uniform).abs().amax(dim=(0, 2, 3)).min() > 1e-3  # every head has its target


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_and_default_blocks(causal, device):
    inputs = make_ar_inputs(2, 6, 2, 19, 19, 16, device=device, layout="random", seed=3)
    _check(inputs, torch.float32, strength=0.5, causal=causal)
    inputs = make_ar_inputs(1, 4, 1, 21, 21, 16, device=device, layout="av", seed=4)
    _check(inputs, torch.float32, strength=0.5, causal=causal, **SMALL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 5])
def test_head_dims(dtype, head_dim, device):
    inputs = make_ar_inputs(1, 2, 1, 9, 20, head_dim, dtype=dtype, device=device, layout="av", seed=5)
    _check(inputs, dtype, strength=0.6, block_n=16)


# --------------------------------------------------------------------------------------------
# split-k (flash-decoding) against the single pass
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_split_matches_single_pass(dtype, device):
    inputs = make_ar_inputs(2, 4, 2, 1, 70, 16, dtype=dtype, device=device, layout="av", left_pad=3, seed=6)
    plan = launch_plan(1, 70, 16, batch=2, n_q_heads=4, n_kv_heads=2, n_classes=3, dtype=dtype, device=device,
                       block_n=16, num_splits=3)
    assert plan["mode"] == "decode" and plan["num_splits"] == 3 and plan["block_m"] == 16  # 3 classes x 2 heads
    kw = dict(strength=0.6, modality_bias=(0.2, -0.4, 0.3), block_n=16)
    o1, m1 = _check(inputs, dtype, num_splits=1, **kw)
    o3, m3 = _check(inputs, dtype, num_splits=3, **kw)
    o5, m5 = _check(inputs, dtype, num_splits=5, **kw)
    assert_close(o3, o1.double(), dtype)
    assert_close(m5, m1.double(), torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_split_with_query_blocks_and_masks(causal, device):
    """Prefill with split-k: with causal masking some splits see nothing for the early queries."""
    inputs = make_ar_inputs(1, 2, 1, 20, 45, 16, device=device, layout="random", seed=7)
    query_mask = torch.rand(1, 20, generator=torch.Generator().manual_seed(1)) < 0.5
    _check(inputs, torch.float32, strength=0.8, causal=causal, query_mask=query_mask.to(device),
           num_splits=3, **SMALL)


def test_split_lq_greater_than_lk(device):
    inputs = make_ar_inputs(1, 2, 2, 20, 18, 16, device=device, layout="random", seed=8)
    o, masses = _check(inputs, torch.float32, strength=0.5, num_splits=2, **SMALL)
    assert torch.equal(o[:, :, :2].cpu(), torch.zeros(1, 2, 2, 16))
    assert torch.equal(masses[:, :, :2].cpu(), torch.zeros(1, 2, 2, 3))


# --------------------------------------------------------------------------------------------
# semantics: padding, masks, bias, masses, underflow, slots
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_lq_greater_than_lk_and_left_padding(dtype, device):
    inputs = make_ar_inputs(2, 2, 1, 23, 19, 16, dtype=dtype, device=device, layout="av", left_pad=17, seed=9)
    o, masses = _check(inputs, dtype, strength=0.5, **SMALL)
    # Lq - Lk = 4 queries see no key; the next 17 see only padding (a whole key block is skipped)
    assert torch.equal(o[:, :, :21].float().cpu(), torch.zeros(2, 2, 21, 16))
    assert torch.equal(masses[:, :, :21].cpu(), torch.zeros(2, 2, 21, 3))


def test_query_mask_and_non_causal(device):
    inputs = make_ar_inputs(2, 2, 2, 17, 17, 16, device=device, layout="random", seed=10)
    query_mask = torch.rand(2, 17, generator=torch.Generator().manual_seed(3)) < 0.5
    o, _ = _check(inputs, torch.float32, strength=0.9, query_mask=query_mask.to(device), causal=False,
                  **SMALL)
    plain, _ = _check(inputs, torch.float32, strength=0.0, causal=False, **SMALL)
    unselected = ~query_mask[:, None, :].expand(-1, 2, -1)
    assert_close(o.cpu()[unselected], plain.cpu()[unselected].double(), torch.float32)
    assert (o.cpu()[~unselected] - plain.cpu()[~unselected]).abs().max() > 1e-3


def test_modality_bias_with_a_mixed_rest_slot(device):
    """Rest slot {0, 3} with different biases, balance slots with their own."""
    inputs = make_ar_inputs(1, 2, 1, 33, 33, 16, n_modalities=4, device=device, layout="random", seed=11)
    for num_splits in (1, 2):
        _check(inputs, torch.float32, num_modalities=4, balance=(2, 1), target=(3.0, 1.0), strength=0.7,
               modality_bias=(0.4, -1.0, 0.6, -0.3), num_splits=num_splits, **SMALL)


def test_masses_sum_to_one_per_visible_query(device):
    inputs = make_ar_inputs(2, 2, 2, 30, 30, 16, device=device, layout="random", seed=12)
    _, masses = _check(inputs, torch.float32, strength=0.5, **SMALL)
    mod = inputs["key_modality"].cpu()
    visible = (mod >= 0)[:, None, :] & (torch.arange(30)[None, None, :] <= torch.arange(30)[None, :, None])
    has_key = visible.any(-1)[:, None, :].expand(-1, 2, -1)  # [B, H, Lq]
    total = masses.sum(-1).cpu()
    assert torch.allclose(total[has_key], torch.ones(()), atol=1e-5)
    assert torch.equal(total[~has_key], torch.zeros_like(total[~has_key]))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_underflowing_balance_modality_gets_its_mass(num_splits, device):
    """Audio scores ~1e4 below the rest (exact integers): its mass is 0 in float32 and float64, and
    reallocation still gives it strength * tau of the balance mass, spread by its own softmax."""
    g = torch.Generator().manual_seed(13)
    ids = _segments([(0, 6), (1, 14), (2, 9), (0, 5)], device)
    q = torch.randint(-1, 2, (1, 2, 34, 16), generator=g).float()
    k = torch.randint(-1, 2, (1, 2, 34, 16), generator=g).float()
    q[..., 0], k[..., 0] = 100.0, 0.0
    k[0, :, (ids[0] == 2).cpu(), 0] = -100.0  # audio scores ~ -1e4 + O(50)
    inputs = dict(q=q.to(device), k=k.to(device), v=torch.randn(1, 2, 34, 16, generator=g).to(device),
                  key_modality=ids)
    o, masses = _check(inputs, torch.float32, scale=1.0, strength=0.5, num_splits=num_splits, **SMALL)
    plain, _ = _run(inputs, scale=1.0, strength=0.0, num_splits=num_splits, **SMALL)
    sees_audio = torch.arange(34) >= 20
    assert (masses[0, :, sees_audio, 2] == 0).all()
    receives = sees_audio & (masses[0, :, :, 1].cpu() > 0.05)  # P_S large enough to move visibly
    assert receives.sum() > 10
    assert ((o - plain).abs().amax(-1)[0].cpu()[receives] > 1e-3).all()


@pytest.mark.parametrize("num_splits", [1, 2])
def test_many_balance_slots(num_splits, device):
    """Up to 8 balance slots, with and without a rest slot."""
    inputs = make_ar_inputs(1, 2, 1, 24, 40, 16, n_modalities=8, device=device, layout="random", seed=14)
    _check(inputs, torch.float32, num_modalities=8, balance=(7, 0, 3, 5, 1), strength=0.6,
           num_splits=num_splits, **SMALL)
    _check(inputs, torch.float32, num_modalities=8, balance=(4, 5, 6, 7, 0, 1, 2, 3), strength=0.6,
           target=(1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0), modality_bias=(0.1,) * 4 + (-0.2,) * 4,
           num_splits=num_splits, **SMALL)


def test_empty_balance_is_plain_attention(device):
    inputs = make_ar_inputs(1, 2, 2, 18, 18, 16, device=device, layout="av", seed=15)
    o, _ = _check(inputs, torch.float32, balance=(), strength=1.0, **SMALL)
    plain, _ = _check(inputs, torch.float32, strength=0.0, **SMALL)
    assert_close(o, plain.double(), torch.float32)


def test_out_of_range_ids_are_padding(device):
    """Unvalidated ids (validate=False on CUDA) outside [-1, M) are skipped, never read through."""
    inputs = make_ar_inputs(1, 2, 2, 20, 20, 16, device=device, layout="random", seed=16)
    bad = inputs["key_modality"].clone()
    bad[0, 3], bad[0, 11], bad[0, 17] = 3, 99, -7
    kw = dict(num_modalities=3, balance=(1, 2), target=None, strength=0.5, threshold=0.0, modality_bias=None,
              causal=True, scale=0.25, query_mask=None, return_masses=True)
    o, masses = ar_attention_triton(inputs["q"], inputs["k"], inputs["v"], bad, block_n=16, **kw)
    kw.pop("return_masses")
    ref_o, ref_m = ar_attention_reference(*(inputs[n].cpu() for n in "qkv"),
                                          torch.where((bad >= 0) & (bad < 3), bad, -1).cpu(), **kw)
    assert_close(o, ref_o, torch.float32)
    assert_close(masses, ref_m, torch.float32)


def test_non_contiguous_inputs(device):
    """q from a (B, L, H, D) projection, k/v strided views, key_modality a column slice."""
    g = torch.Generator().manual_seed(17)
    q = torch.randn(1, 19, 4, 16, generator=g).to(device).transpose(1, 2)
    kv = torch.randn(1, 2, 19, 2, 16, generator=g).to(device)
    mod = torch.stack([av_layout(19), av_layout(19)], dim=1)[None].to(device)  # [1, 19, 2]
    inputs = dict(q=q, k=kv[..., 0, :], v=kv[..., 1, :], key_modality=mod[..., 0])
    assert not inputs["q"].is_contiguous() and inputs["k"].stride(-1) == 1 and not inputs["k"].is_contiguous()
    _check(inputs, torch.float32, strength=0.5, **SMALL)
    inputs["q"] = inputs["q"][..., ::2]  # last-dim stride 2: copied by the launcher
    inputs["k"], inputs["v"] = inputs["k"][..., ::2], inputs["v"][..., ::2]
    _check(inputs, torch.float32, strength=0.5, **SMALL)


def test_empty_keys(device):
    inputs = make_ar_inputs(1, 2, 2, 3, 0, 16, device=device)
    o, masses = _run(inputs)
    assert torch.equal(o.cpu(), torch.zeros(1, 2, 3, 16))
    assert torch.equal(masses.cpu(), torch.zeros(1, 2, 3, 3))


# --------------------------------------------------------------------------------------------
# gradients: routed to the PyTorch backend's autograd
# --------------------------------------------------------------------------------------------


def test_gradients_route_to_torch_backend_and_match_reference(device):
    inputs = make_ar_inputs(1, 4, 2, 9, 9, 16, device=device, layout="av", seed=18)
    kw = dict(num_modalities=3, strength=0.7, modality_bias=(0.2, -0.3, 0.1))
    leaves = {n: inputs[n].detach().clone().requires_grad_(n != "k") for n in "qkv"}
    o = ar_attention(leaves["q"], leaves["k"], leaves["v"], inputs["key_modality"], backend="triton",
                     block_n=16, **kw)
    assert o.requires_grad
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o)
    o.backward(do)
    ref = {n: inputs[n].detach().cpu().double().requires_grad_(True) for n in "qkv"}
    ref_o, _ = ar_attention_reference(ref["q"], ref["k"], ref["v"], inputs["key_modality"].cpu(), **kw)
    ref_o.backward(do.double().cpu())
    assert_close(o, ref_o, torch.float32)
    for n in "qv":
        assert_close(leaves[n].grad, ref[n].grad, torch.float32, what=f"grad {n}")
    with torch.no_grad():  # no autograd recording: the Triton kernels run, same values
        o_fast = ar_attention(leaves["q"], leaves["k"], leaves["v"], inputs["key_modality"], backend="triton",
                              block_n=16, **kw)
    assert not o_fast.requires_grad
    assert_close(o_fast, ref_o, torch.float32)


# ------------------------------------------------------------------------------------------------
# Real compilation without a GPU (the interpreter accepts code the compiler rejects)
# ------------------------------------------------------------------------------------------------

_LAUNCH_SCRIPT = """
    import torch
    from mosear_fast.kernels.ar_attention.launch import ar_attention_fwd

    # (dtype, B, Hq, Hkv, Lq, Lk, D, options): prefill (enough tiles: no split) with masses, a split
    # rest and a query mask; prefill with split-k (odd lengths, head dim 80); decode with GQA packing
    # (7 query heads per KV head, 3 queries, float32); decode with GQA (bfloat16).
    CASES = [(torch.bfloat16, 2, 32, 8, 512, 512, 128, dict(return_masses=True, num_modalities=4,
              modality_bias=(0.5, 0.0, 0.0, -0.5), query_mask=torch.ones(2, 512, dtype=torch.bool))),
             (torch.float16, 1, 2, 1, 40, 900, 80, dict(num_splits=3)),
             (torch.float32, 2, 7, 1, 3, 300, 64, dict(return_masses=True)),
             (torch.bfloat16, 1, 28, 4, 1, 700, 128, dict())]
    for dtype, b, hq, hkv, lq, lk, d, opts in CASES:
        args = dict(num_modalities=3, balance=(1, 2), target=None, strength=0.5, threshold=0.0, modality_bias=None,
                    causal=True, scale=d ** -0.5, query_mask=None, return_masses=False)
        args.update(opts)
        q = torch.empty(b, hq, lq, d, dtype=dtype)
        k, v = torch.empty(b, hkv, lk, d, dtype=dtype), torch.empty(b, hkv, lk, d, dtype=dtype)
        ar_attention_fwd(q, k, v, torch.zeros(b, lk, dtype=torch.long), **args)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every launch the launcher makes (classification, prefill, decode, merge) goes through Triton's
    real pipeline (TTIR to cubin, sm_90a) with the specialisation of a real launch, in a process
    without the interpreter (the bundled ptxas, no GPU), at shapes off the presets: odd lengths,
    head dim 80, split-k prefill, GQA decode with several queries, float32."""
    records = compile_launches(_LAUNCH_SCRIPT)
    prefill = ["ar_classify_kernel", "ar_prefill_kernel"]
    decode = ["ar_decode_kernel", "ar_split_merge_kernel"]
    assert [r["kernel"] for r in records] == prefill + prefill + ["ar_split_merge_kernel"] + decode + decode
    for r in records:
        assert r["spill_bytes"] == 0, (r["kernel"], r["grid"])
        if r["kernel"] in ("ar_prefill_kernel", "ar_decode_kernel"):
            assert r["pipelined"] and r["mma_instructions"] == r["expected_mma_instructions"], r["kernel"]
