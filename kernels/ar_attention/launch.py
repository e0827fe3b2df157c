"""Launchers of the AR attention Triton kernels: block sizes, split-k choice, allocation, grids.

Inputs are validated by ``mosear_fast`` before they get here. On CPU tensors the kernels run only
under the Triton interpreter (``TRITON_INTERPRET=1``); nothing here sets it.
"""

from __future__ import annotations

import functools

import torch
import triton

from ..alloc import empty_output
from ..target import interpreted, multiprocessor_count
from .triton_kernels import MAX_BALANCE_SLOTS, ar_attention_fwd_kernel, ar_split_merge_kernel

# Register budget of the accumulators of one program, in fp32 elements: three 64 x 128 states
# (DESIGN 2.2: |S| + 1 = 3 states of a 64-row query block fit at head dim 128, 128 rows do not).
_ACC_BUDGET = 3 * 64 * 128
_MERGE_BLOCK_M = 16
_MAX_SPLITS = 128
_MIN_BLOCKS_PER_SPLIT = 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


@functools.lru_cache(maxsize=64)
def _params(device: torch.device, num_modalities: int, balance: tuple, target: tuple | None,
            modality_bias: tuple | None):
    """Small per-call tables, built once per configuration and device (no host copy per call).

    slot (M,) int32: balance modality -> its slot index, other modality -> the rest slot;
    tau (|S|,) float32 raw targets in slot order; balmod (|S|,) int32 modality of each slot;
    slot_bias (NSP,) float32: the bias of each balance slot's modality, and the largest bias of
    the rest modalities for the rest slot; key_bias (M,) float32: each modality's bias minus its
    slot's. The kernel adds key_bias to the scores and slot_bias to the slot's max at the end, so a
    bias that is constant over a slot (every balance slot; the rest slot when its modalities share
    one bias) never rounds the scores: a bias of -1e4 keeps the scores' float32 precision.
    """
    n_bal = len(balance)
    slot = [n_bal] * num_modalities
    for c, m in enumerate(balance):
        slot[m] = c
    tau = list(target) if target is not None else [1.0] * n_bal
    bias = list(modality_bias) if modality_bias is not None else [0.0] * num_modalities
    slot_bias = [0.0] * _next_pow2(n_bal + 1)
    for c, m in enumerate(balance):
        slot_bias[c] = bias[m]
    rest = [bias[m] for m in range(num_modalities) if slot[m] == n_bal]
    slot_bias[n_bal] = max(rest) if rest else 0.0
    key_bias = [bias[m] - slot_bias[slot[m]] for m in range(num_modalities)]
    f32 = dict(dtype=torch.float32, device=device)
    return dict(
        slot=torch.tensor(slot, dtype=torch.int32, device=device),
        tau=torch.tensor(tau or [0.0], **f32),
        balmod=torch.tensor(list(balance) or [0], dtype=torch.int32, device=device),
        slot_bias=torch.tensor(slot_bias, **f32),
        key_bias=torch.tensor(key_bias, **f32),
        has_key_bias=any(b != 0.0 for b in key_bias),
    )


def _block_sizes(len_q: int, block_d: int, n_slots: int, block_m: int | None, block_n: int | None):
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    if block_m is None:
        block_m = min(128, max(16, _pow2_floor(_ACC_BUDGET // (n_slots * block_d))))
        block_m = min(block_m, max(16, _next_pow2(len_q)))  # decode: no 64-row block for one query
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}: expected a power of two >= 16, got {value}")
    return block_m, block_n


def _num_splits(n_programs: int, len_k: int, block_n: int, device: torch.device,
                requested: int | None) -> int:
    """Flash-decoding: split the keys over programs when the query blocks alone cannot fill the GPU."""
    n_blocks = triton.cdiv(len_k, block_n)
    if requested is not None:
        if requested < 1:
            raise ValueError(f"num_splits: expected an int >= 1, got {requested}")
        return max(1, min(requested, n_blocks))
    n_sm = multiprocessor_count(device)
    if n_sm is None:  # the interpreter: no SMs to fill
        return 1
    if n_programs >= n_sm:
        return 1
    return max(1, min(triton.cdiv(2 * n_sm, n_programs), n_blocks // _MIN_BLOCKS_PER_SPLIT, _MAX_SPLITS))


def ar_attention_fwd(q, k, v, key_modality, *, num_modalities, balance, target, strength, threshold,
                     modality_bias, causal, scale, query_mask, return_masses, block_m=None, block_n=None,
                     num_splits=None):
    """Runs the forward kernels; returns ``(o, masses)`` (masses None unless ``return_masses``)."""
    batch, n_q_heads, len_q, head_dim = q.shape
    n_kv_heads, len_k = k.shape[1], k.shape[2]
    n_mod = num_modalities
    n_bal = len(balance)
    if n_bal > MAX_BALANCE_SLOTS:
        raise ValueError(f"balance: at most {MAX_BALANCE_SLOTS} modalities, got {n_bal}")
    device = q.device
    o = empty_output((batch, n_q_heads, len_q, head_dim), dtype=q.dtype, device=device)
    masses = empty_output((batch, n_q_heads, len_q, n_mod), dtype=torch.float32, device=device) \
        if return_masses else None
    if o.numel() == 0:
        return o, masses
    if len_k == 0:  # no query sees a key
        o.zero_()
        if masses is not None:
            masses.zero_()
        return o, masses

    # The kernels take any strides; a unit last stride keeps the loads coalesced.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    tables = _params(device, n_mod, tuple(balance), target, modality_bias)
    slot, tau, balmod, slot_bias = tables["slot"], tables["tau"], tables["balmod"], tables["slot_bias"]
    qmask = query_mask.view(torch.uint8) if query_mask is not None else slot  # dummy pointer when absent

    has_rest = n_mod > n_bal
    nsp = _next_pow2(n_bal + 1)  # slot columns incl. the rest slot
    mp = _next_pow2(n_mod)
    plan = launch_plan(len_q, len_k, head_dim, batch=batch, n_q_heads=n_q_heads,
                       n_slots=n_bal + int(has_rest), device=device, block_m=block_m, block_n=block_n,
                       num_splits=num_splits)
    block_m, block_n, block_d = plan["block_m"], plan["block_n"], plan["block_d"]
    splits, keys_per_split = plan["num_splits"], plan["keys_per_split"]
    n_m_blocks = triton.cdiv(len_q, block_m)
    use_split = splits > 1
    interpreter_bf16 = q.dtype == torch.bfloat16 and interpreted(device)

    masses_arg = masses if masses is not None else o
    mass_strides = masses.stride() if masses is not None else (0, 0, 0, 0)
    bh = batch * n_q_heads
    if use_split:
        part_m = empty_output((bh, splits, nsp, len_q), dtype=torch.float32, device=device)
        part_l = empty_output((bh, splits, nsp, len_q), dtype=torch.float32, device=device)
        part_lm = empty_output((bh, splits, mp, len_q), dtype=torch.float32, device=device)
        part_acc = empty_output((bh, splits, nsp, len_q, block_d), dtype=torch.float32, device=device)
    else:
        part_m = part_l = part_lm = part_acc = o  # unused
    num_warps = 4 if block_m * block_d <= 64 * 64 else 8
    common = dict(HEAD_DIM=head_dim, NUM_MOD=n_mod, NUM_BAL=n_bal, NSP=nsp, MP=mp, HAS_REST=has_rest)

    ar_attention_fwd_kernel[(n_m_blocks, bh, splits)](
        q, k, v, key_modality, qmask, slot, tables["key_bias"], slot_bias, tau, balmod,
        o, masses_arg, part_m, part_l, part_lm, part_acc,
        *q.stride(), *k.stride(), *v.stride(),
        *key_modality.stride(), *(query_mask.stride() if query_mask is not None else (0, 0)),
        *o.stride(), *mass_strides,
        len_q, len_k, n_q_heads, n_q_heads // n_kv_heads, keys_per_split, splits,
        float(scale), float(strength), float(threshold),
        CAUSAL=causal, HAS_KEY_BIAS=tables["has_key_bias"], HAS_QMASK=query_mask is not None,
        RETURN_MASSES=return_masses, SPLIT=use_split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        # fp32: ieee dots (no tf32 rounding). bf16 on the CPU (the Triton interpreter, whose dot
        # multiplies bf16 as raw uint16): operands widened exactly to fp32 in the kernel.
        DOT_PREC="ieee" if q.dtype == torch.float32 or interpreter_bf16 else "tf32",
        DOT_UPCAST=interpreter_bf16,
        num_warps=num_warps, num_stages=2, **common,
    )
    if use_split:
        ar_split_merge_kernel[(triton.cdiv(len_q, _MERGE_BLOCK_M), bh)](
            part_m, part_l, part_lm, part_acc, qmask, tau, balmod, slot_bias, o, masses_arg,
            *(query_mask.stride() if query_mask is not None else (0, 0)),
            *o.stride(), *mass_strides,
            len_q, n_q_heads, splits, float(strength), float(threshold),
            HAS_QMASK=query_mask is not None, RETURN_MASSES=return_masses,
            BLOCK_M=_MERGE_BLOCK_M, BLOCK_D=block_d, num_warps=4, **common,
        )
    return o, masses


def launch_plan(len_q: int, len_k: int, head_dim: int, *, batch: int, n_q_heads: int, n_slots: int,
                device: torch.device, block_m=None, block_n=None, num_splits=None) -> dict:
    """Block sizes and the split of the key range that ``ar_attention_fwd`` uses."""
    block_d = max(16, _next_pow2(head_dim))
    block_m, block_n = _block_sizes(len_q, block_d, n_slots, block_m, block_n)
    n_programs = triton.cdiv(len_q, block_m) * batch * n_q_heads
    splits = _num_splits(n_programs, len_k, block_n, device, num_splits)
    keys_per_split = triton.cdiv(triton.cdiv(max(len_k, 1), splits), block_n) * block_n
    return dict(block_m=block_m, block_n=block_n, block_d=block_d,
                num_splits=triton.cdiv(max(len_k, 1), keys_per_split), keys_per_split=keys_per_split)
