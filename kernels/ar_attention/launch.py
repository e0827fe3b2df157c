"""Launchers of the AR attention Triton kernels: key classes, launch plan, allocation, grids.

Inputs are validated by ``mosear_fast`` before they get here. On CPU tensors the kernels run only
under the Triton interpreter (``TRITON_INTERPRET=1``); nothing here sets it.

Host path: plain integer arithmetic (no ``triton.cdiv`` / ``next_power_of_2``, which cost ~4 us per
Python call in Triton 3.9), the small per-configuration tables built once and cached, and no host
read of device data, so a call launched inside CUDA-graph capture after a first call is capturable.
"""

from __future__ import annotations

import functools

import torch

from ..alloc import empty_output
from ..interpreter_compat import install as _install_interpreter_fix
from ..target import interpreted, multiprocessor_count
from .torch_backend import is_per_head
from .triton_kernels import (
    LOG2E,
    MAX_CLASSES,
    ar_classify_kernel,
    ar_decode_kernel,
    ar_prefill_kernel,
    ar_split_merge_kernel,
)

_install_interpreter_fix()

# Decode kernel for a few queries (decode, speculative verification) when (classes x query heads per
# KV head x queries) fit in one block of this many rows; longer query runs go to the prefill kernel.
_DECODE_MAX_QUERIES = 8
_DECODE_ROWS = 64
# Merge tiles [queries, splits, head dim]: up to 32 splits at once, 4096 fp32 per accumulator tile.
_MERGE_SPLIT_BLOCK = 32
_MERGE_TILE = 4096
_MAX_SPLITS = 128
_MIN_BLOCKS_PER_SPLIT = 2  # decode: at least this many key blocks per split
_PREFILL_MIN_BLOCKS_PER_SPLIT = 4
_CLASSIFY_CHUNK = 64  # key blocks per step of the classification pre-pass
# Persistent prefill grid: as many programs as fit on the SMs at once (the 128-row, 8-warp program:
# ~245 registers per thread and 131 KB of shared memory, one per SM; the 4-warp ones, two), and in the
# interpreter a few programs, so that every program runs several tiles there too.
_INTERPRETER_PROGRAMS = 3
# Pipeline depths (checked in the TTGIR): the prefill loop first loads its block index, which takes a
# stage, so 5 stages keep three K/V blocks in flight; decode (direct addressing) gets three with 4.
_PREFILL_STAGES = 5
_DECODE_STAGES = 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=64)
def _classes(num_modalities: int, balance: tuple, target: tuple | None, modality_bias: tuple | None,
             split_rest: bool) -> dict:
    """The key classes of a configuration (host lists; see ``_class_tables`` for the device tables).

    Classes 0..|S|-1 are the balance modalities in ``balance`` order; then the rest: one class for
    all other modalities, or one class each when ``split_rest`` or when their biases differ (a class's
    bias must be constant over its keys). class_of_mod (M,): each modality's class; class_mod
    (NSP,): each class's modality for the masses output (-1: several, or a padding column);
    class_bias (NSP,): each class's bias; tau (rows, NSP): the targets per class, one row, or one per
    query head when ``target`` holds one tuple per head.
    """
    bias = list(modality_bias) if modality_bias is not None else [0.0] * num_modalities
    rest = [m for m in range(num_modalities) if m not in balance]
    separate = split_rest or len({bias[m] for m in rest}) > 1
    members = [[m] for m in balance] + ([[m] for m in rest] if separate else ([rest] if rest else []))
    n_cls = len(members)
    if n_cls > MAX_CLASSES:
        raise ValueError(f"num_modalities: the Triton kernels keep at most {MAX_CLASSES} key classes (balance "
                         f"modalities, plus the others split by bias or for the masses output), got {n_cls}")
    nsp = _next_pow2(n_cls)
    class_of_mod = [0] * num_modalities
    for c, mods in enumerate(members):
        for m in mods:
            class_of_mod[m] = c
    pad = [0.0] * (nsp - n_cls)
    rows = target if is_per_head(target) else [target if target is not None else (1.0,) * len(balance)]
    return dict(
        n_cls=n_cls, nsp=nsp, class_of_mod=class_of_mod,
        class_mod=[mods[0] if len(mods) == 1 else -1 for mods in members] + [-1] * (nsp - n_cls),
        class_bias=[bias[mods[0]] for mods in members] + pad,
        tau=[list(row) + [0.0] * (nsp - len(balance)) for row in rows],
    )


@functools.lru_cache(maxsize=64)
def _class_tables(device: torch.device, num_modalities: int, balance: tuple, target: tuple | None,
                  modality_bias: tuple | None, split_rest: bool) -> dict:
    """Device copies of ``_classes``, built once per configuration and device (no host copy per call)."""
    cls = _classes(num_modalities, balance, target, modality_bias, split_rest)
    i32, f32 = dict(dtype=torch.int32, device=device), dict(dtype=torch.float32, device=device)
    return dict(cls, class_of_mod_t=torch.tensor(cls["class_of_mod"], **i32),
                class_mod_t=torch.tensor(cls["class_mod"], **i32),
                class_bias_t=torch.tensor(cls["class_bias"], **f32), tau_t=torch.tensor(cls["tau"], **f32))


def _check_block(name: str, value: int) -> int:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name}: expected a power of two >= 16, got {value}")
    return value


def launch_plan(len_q: int, len_k: int, head_dim: int, *, batch: int, n_q_heads: int, n_kv_heads: int,
                n_classes: int, dtype: torch.dtype, device: torch.device, window: int | None = None,
                block_m=None, block_n=None, num_splits=None) -> dict:
    """Which kernels ``ar_attention_fwd`` runs and how: ``mode`` "decode" (the rows of one block are
    classes x query heads of a KV group x queries) or "prefill" (query blocks of one head, one class
    at a time, persistent grid); block sizes, warps, stages, the key split and the grid.

    float32 runs exact (IEEE) dots on CUDA cores, whose operands live in registers: narrower key
    blocks (and for decode, 8 warps and 2 stages) keep them from spilling (checked with the compiled
    register counts, ``python -m bench.kernel_report``)."""
    ieee = dtype == torch.float32
    block_d = max(16, _next_pow2(head_dim))
    group = n_q_heads // n_kv_heads
    n_sm = None if interpreted(device) else multiprocessor_count(device)  # None: no SMs to fill
    rows = n_classes * group * len_q
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits: expected an int >= 1, got {num_splits}")
    if block_m is None and len_q <= _DECODE_MAX_QUERIES and rows <= _DECODE_ROWS:
        block_n = _check_block("block_n", block_n if block_n is not None else (16 if ieee else 64))
        # the keys some query can see: with a window, the last window + Lq - 1 only
        key_start = 0 if window is None else max(0, len_k - len_q - window + 1)
        len_k -= key_start
        n_blocks = max(1, _cdiv(len_k, block_n))
        programs = batch * n_kv_heads
        if num_splits is not None:
            splits = num_splits
        elif n_sm is None or programs >= n_sm:
            splits = 1
        else:  # flash-decoding: split the keys until the SMs are filled
            splits = min(_cdiv(n_sm, programs), max(1, n_blocks // _MIN_BLOCKS_PER_SPLIT), _MAX_SPLITS)
        keys_per_split = _cdiv(_cdiv(max(len_k, 1), min(splits, n_blocks)), block_n) * block_n
        splits = _cdiv(max(len_k, 1), keys_per_split)
        return dict(mode="decode", block_m=max(16, _next_pow2(rows)), block_n=block_n, block_d=block_d,
                    num_warps=8 if ieee else 4, num_stages=2 if ieee else _DECODE_STAGES, num_splits=splits,
                    key_start=key_start, keys_per_split=keys_per_split, grid=(programs, splits))

    if block_m is None:
        block_m = min(128, max(16, _next_pow2(len_q)))
    if block_n is None:  # one warpgroup holding a 64 x 128 accumulator spills with 64-key blocks
        block_n = 32 if ieee or block_d > 128 or (block_m == 64 and block_d == 128) else 64
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    n_blocks = max(1, _cdiv(len_k, block_n))
    n_qblocks = _cdiv(len_q, block_m)
    tiles = n_qblocks * batch * n_q_heads
    if num_splits is not None:
        splits = num_splits
    elif n_sm is None or tiles >= n_sm:
        splits = 1
    else:
        splits = min(_cdiv(n_sm, tiles), max(1, n_blocks // _PREFILL_MIN_BLOCKS_PER_SPLIT), _MAX_SPLITS)
    blocks_per_split = _cdiv(n_blocks, min(splits, n_blocks))
    splits = _cdiv(n_blocks, blocks_per_split)
    tiles *= splits
    num_warps = 8 if block_m >= 128 else 4  # one warpgroup per 64 rows (wgmma's M)
    programs = _INTERPRETER_PROGRAMS if n_sm is None else (1 if num_warps == 8 else 2) * n_sm
    return dict(mode="prefill", block_m=block_m, block_n=block_n, block_d=block_d, num_warps=num_warps,
                num_stages=_PREFILL_STAGES, num_splits=splits, blocks_per_split=blocks_per_split,
                n_kblocks=n_blocks, n_qblocks=n_qblocks, n_tiles=tiles, grid=(min(tiles, programs),))


def ar_attention_fwd(q, k, v, key_modality, *, num_modalities, balance, target, strength, threshold,
                     modality_bias, causal, scale, query_mask, return_masses, window=None, softcap=None,
                     balance_by="mass", block_m=None, block_n=None, num_splits=None):
    """Runs the forward kernels; returns ``(o, masses)`` (masses None unless ``return_masses``)."""
    batch, n_q_heads, len_q, head_dim = q.shape
    n_kv_heads, len_k = k.shape[1], k.shape[2]
    device = q.device
    o = empty_output((batch, n_q_heads, len_q, head_dim), dtype=q.dtype, device=device)
    masses = empty_output((batch, n_q_heads, len_q, num_modalities), dtype=torch.float32, device=device) \
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
    balance = tuple(balance)
    split_rest = return_masses and num_modalities - len(balance) > 1  # rest masses per modality
    tables = _class_tables(device, num_modalities, balance, target, modality_bias, split_rest)
    n_cls, nsp = tables["n_cls"], tables["nsp"]
    plan = launch_plan(len_q, len_k, head_dim, batch=batch, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads,
                       n_classes=n_cls, dtype=q.dtype, device=device, window=window, block_m=block_m,
                       block_n=block_n, num_splits=num_splits)
    block_m, block_n, block_d, splits = plan["block_m"], plan["block_n"], plan["block_d"], plan["num_splits"]
    interpreter_bf16 = q.dtype == torch.bfloat16 and interpreted(device)
    # fp32: ieee dots (no tf32 rounding). bf16 in the Triton interpreter (whose dot multiplies bf16 as
    # raw uint16): operands widened exactly to fp32 in the kernel.
    numerics = dict(DOT_PREC="ieee" if q.dtype == torch.float32 or interpreter_bf16 else "tf32",
                    DOT_UPCAST=interpreter_bf16)
    # Raw scores q.k inside the kernels; |scale| * log2(e) in the exponent, a negative scale negates q.
    # A zero scale (every score equal) runs as 1e-30: the same softmax to ~1e-26. With a softcap the
    # kernels compute softcap * tanh(|scale| * q.k / softcap), in natural units.
    qk_scale = abs(float(scale))
    c_log2 = LOG2E if softcap is not None else max(qk_scale * LOG2E, 1e-30)
    mp = _next_pow2(num_modalities)
    classes = dict(HEAD_DIM=head_dim, NUM_MOD=num_modalities, NUM_CLS=n_cls, NSP=nsp)
    scores = dict(CAUSAL=causal, WINDOW=window is not None, SOFTCAP=softcap is not None, NEG_SCALE=float(scale) < 0)
    score_args = (window or 0, qk_scale, float(softcap or 1.0))
    balancing = dict(NUM_BAL=len(balance), MP=mp, BY_CONTRIBUTION=balance_by == "contribution",
                     HAS_QMASK=query_mask is not None, RETURN_MASSES=return_masses)
    tau_head_stride = nsp if len(tables["tau"]) > 1 else 0  # per-head targets: one table row per head
    masses_arg = masses if masses is not None else o
    mass_strides = masses.stride() if masses is not None else (0, 0, 0, 0)
    qmask = query_mask.view(torch.uint8) if query_mask is not None else tables["class_of_mod_t"]  # dummy if absent
    qmask_strides = query_mask.stride() if query_mask is not None else (0, 0)
    bh = batch * n_q_heads
    use_merge = plan["mode"] == "decode" or splits > 1
    if use_merge:  # partial states (B*Hq, splits, NSP, Lq[, BD]): max, sum, accumulator, in one allocation
        n_rows = bh * splits * nsp * len_q
        part = empty_output((n_rows * (block_d + 2),), dtype=torch.float32, device=device)
        part_m, part_l, part_acc = part[:n_rows], part[n_rows:2 * n_rows], part[2 * n_rows:]
    else:
        part_m = part_l = part_acc = o  # unused

    if plan["mode"] == "decode":
        ar_decode_kernel[plan["grid"]](
            q, k, v, key_modality, tables["class_of_mod_t"], part_m, part_l, part_acc,
            *q.stride(), *k.stride(), *v.stride(), *key_modality.stride(),
            len_q, len_k, n_q_heads, n_kv_heads, n_q_heads // n_kv_heads, plan["key_start"], plan["keys_per_split"],
            splits, *score_args, c_log2, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=plan["num_warps"], num_stages=plan["num_stages"], **scores, **numerics, **classes,
        )
    else:
        n_kblocks = plan["n_kblocks"]
        # One int32 buffer: key classes (B, n_kblocks * BN), block lists (B, C, n_kblocks), prefix counts.
        n_keys, n_list, n_pref = batch * n_kblocks * block_n, batch * n_cls * n_kblocks, batch * n_cls * (n_kblocks + 1)
        class_buf = torch.empty(n_keys + n_list + n_pref, dtype=torch.int32, device=device)
        key_cls, lists, pref = class_buf[:n_keys], class_buf[n_keys:n_keys + n_list], class_buf[n_keys + n_list:]
        ar_classify_kernel[(batch,)](
            key_modality, tables["class_of_mod_t"], key_cls, lists, pref, *key_modality.stride(), len_k, n_kblocks,
            NUM_MOD=num_modalities, NUM_CLS=n_cls, NSP=nsp, BLOCK_N=block_n, CHUNK=_CLASSIFY_CHUNK, num_warps=4,
        )
        n_prog = plan["grid"][0]
        # Per program: parked accumulators of all classes but the last one, and every class's max, sum
        # and accumulator norm.
        park = o if splits > 1 else torch.empty(
            n_prog * ((n_cls - 1) * block_d + 3 * n_cls) * block_m, dtype=torch.float32, device=device)
        ar_prefill_kernel[plan["grid"]](
            q, k, v, qmask, key_cls, lists, pref, tables["class_bias_t"], tables["tau_t"], tables["class_mod_t"],
            o, masses_arg, park, part_m, part_l, part_acc,
            *q.stride(), *k.stride(), *v.stride(), *qmask_strides, *o.stride(), *mass_strides, tau_head_stride,
            len_q, len_k, n_q_heads, n_q_heads // n_kv_heads, n_kblocks, plan["n_qblocks"], bh, plan["n_tiles"],
            plan["blocks_per_split"], splits, *score_args, c_log2, float(strength), float(threshold),
            SPLIT=splits > 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=plan["num_warps"],
            num_stages=plan["num_stages"], **scores, **balancing, **numerics, **classes,
        )
    if use_merge:
        split_block = min(_next_pow2(splits), _MERGE_SPLIT_BLOCK)
        block_q = max(1, min(_next_pow2(len_q), _MERGE_TILE // (split_block * block_d)))
        ar_split_merge_kernel[(_cdiv(len_q, block_q), bh)](
            part_m, part_l, part_acc, qmask, tables["class_bias_t"], tables["tau_t"], tables["class_mod_t"],
            o, masses_arg, *qmask_strides, *o.stride(), *mass_strides, tau_head_stride,
            len_q, n_q_heads, splits, c_log2, float(strength), float(threshold),
            BLOCK_Q=block_q, SPLIT_BLOCK=split_block, BLOCK_D=block_d, num_warps=4,
            # Without an explicit ceiling ptxas caps this kernel lower (~64 registers) and spills a few
            # values; the hardware's 255 lets it keep them (checked in the kernel report, Triton 3.6 and 3.9).
            maxnreg=255, **balancing, **classes,
        )
    return o, masses
