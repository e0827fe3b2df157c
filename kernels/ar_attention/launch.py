"""Launchers of the AR attention Triton kernels: key classes, launch plan, allocation, grids.

Inputs are validated by ``mosear_fast`` before they get here. On CPU tensors the kernels run only
under the Triton interpreter (``TRITON_INTERPRET=1``); nothing here sets it.

Host path (``python -m bench.host_overhead`` times it): everything that depends only on shapes, dtype,
device and configuration (the plan, the constexprs, the integer arguments, scratch sizes) is computed
once per key with plain integer arithmetic (no ``triton.cdiv`` / ``next_power_of_2``, which cost ~4 us
per Python call in Triton 3.9) and cached (``_launch``); a call then allocates its output and one
split-k buffer and launches with its tensors, strides and float scalars. Nothing reads device data
on the host and every size depends on shapes only, so a call can be captured in a CUDA graph. The
small per-configuration device tables (``class_tables``) are the one thing built on a first call: a
first call inside capture raises a RuntimeError naming the warm-up (``prepare_tables`` builds them
ahead).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..alloc import empty_output, poison_enabled
from ..interpreter_compat import install as _install_interpreter_fix
from ..launching import positional_constexprs
from ..target import plan_facts
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
    """The key classes of a configuration (host lists; see ``class_tables`` for the device tables).

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


# (device, configuration) -> the device tables of ``_classes``; filled outside CUDA-graph capture.
_TABLES: dict[tuple, dict] = {}
_MAX_TABLES = 256


def class_tables(device: torch.device, num_modalities: int, balance: tuple, target: tuple | None,
                 modality_bias: tuple | None, split_rest: bool) -> dict:
    """Device copies of ``_classes``, built on the first call of a configuration and device and reused
    (no host-to-device copy per call).

    Building them copies host lists to the device, which a CUDA graph cannot capture: a first call of
    a configuration inside capture raises a RuntimeError saying what to warm up. ``prepare_tables``
    (or one call of the op with the same configuration, any shapes) before capture builds them.
    """
    key = (device, num_modalities, balance, target, modality_bias, split_rest)
    tables = _TABLES.get(key)
    if tables is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "ar_attention: the key-class tables of this configuration (num_modalities="
                f"{num_modalities}, balance={balance}, target={target}, modality_bias={modality_bias}, "
                f"return_masses with more than one unbalanced modality={split_rest}) on {device} are built "
                "on its first call, which a CUDA graph cannot capture (a host-to-device copy); call "
                "ar_attention once with the same arguments before capture (any shapes), or "
                "mosear_fast.kernels.ar_attention.launch.prepare_tables(...)")
        cls = _classes(num_modalities, balance, target, modality_bias, split_rest)
        i32, f32 = dict(dtype=torch.int32, device=device), dict(dtype=torch.float32, device=device)
        tables = dict(cls, class_of_mod_t=torch.tensor(cls["class_of_mod"], **i32),
                      class_mod_t=torch.tensor(cls["class_mod"], **i32),
                      class_bias_t=torch.tensor(cls["class_bias"], **f32), tau_t=torch.tensor(cls["tau"], **f32))
        if len(_TABLES) >= _MAX_TABLES:
            del _TABLES[next(iter(_TABLES))]  # the oldest configuration
        _TABLES[key] = tables
    return tables


def prepare_tables(device, *, num_modalities: int, balance=(1, 2), target=None, modality_bias=None,
                   return_masses: bool = False) -> dict:
    """Builds the device tables of one ``ar_attention`` configuration ahead of CUDA-graph capture.

    Arguments as the op's, already normalised the way ``mosear_fast.ar_attention`` passes them to the
    backend: ``balance`` a tuple of ints, ``target`` None or the normalised tuple (or tuple of
    per-head tuples), ``modality_bias`` None or a tuple of floats."""
    balance = tuple(balance)
    split_rest = return_masses and num_modalities - len(balance) > 1
    return class_tables(torch.device(device), num_modalities, balance, target, modality_bias, split_rest)


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
    _, n_sm = plan_facts(device)
    return dict(_plan(len_q, len_k, head_dim, batch, n_q_heads, n_kv_heads, n_classes, dtype == torch.float32,
                      n_sm, window, block_m, block_n, num_splits))


@functools.lru_cache(maxsize=1024)
def _plan(len_q, len_k, head_dim, batch, n_q_heads, n_kv_heads, n_classes, ieee, n_sm, window, block_m, block_n,
          num_splits) -> dict:
    """``launch_plan`` for plain ints (``n_sm`` None: no SMs to fill, the interpreter); cached."""
    block_d = max(16, _next_pow2(head_dim))
    group = n_q_heads // n_kv_heads
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


@dataclass(frozen=True)
class _Launch:
    """Everything of a call that depends only on shapes, dtype, device and the configuration: the
    plan, the device tables, the constexpr keyword arguments of each kernel, the integer arguments
    and the sizes of the scratch buffers. Built once per key (``_launch``); a call adds its tensors,
    strides and float scalars."""

    mode: str
    grid: tuple
    tables: dict
    main_const: tuple  # the decode or prefill kernel's constexprs, positional (``launching``)
    main_opts: dict  # and its launch options
    main_ints: tuple  # its integer arguments after the strides
    tau_head_stride: int
    part_split: tuple | None  # (rows, rows, rows * BLOCK_D) of the split-k partial states; None: no merge
    class_split: tuple = ()  # prefill: key classes, block lists, prefix counts (int32)
    classify_const: tuple = ()
    classify_opts: dict | None = None
    park_size: int = 0  # prefill without split: fp32 parked states per program
    merge_grid: tuple = ()
    merge_const: tuple = ()
    merge_opts: dict | None = None
    merge_ints: tuple = ()


def _split(name: str, kernel, kwargs: dict) -> dict:
    const, opts = positional_constexprs(kernel, kwargs)
    return {f"{name}_const": const, f"{name}_opts": opts}


@functools.lru_cache(maxsize=1024)
def _launch(batch, n_q_heads, n_kv_heads, len_q, len_k, head_dim, dtype, device, facts, num_modalities, balance,
            target, modality_bias, split_rest, causal, window, softcap, neg_scale, balance_by, has_qmask,
            return_masses, block_m, block_n, num_splits) -> _Launch:
    interp, n_sm = facts
    tables = class_tables(device, num_modalities, balance, target, modality_bias, split_rest)
    n_cls, nsp = tables["n_cls"], tables["nsp"]
    plan = _plan(len_q, len_k, head_dim, batch, n_q_heads, n_kv_heads, n_cls, dtype == torch.float32,
                 None if interp else n_sm, window, block_m, block_n, num_splits)
    block_m, block_n, block_d, splits = plan["block_m"], plan["block_n"], plan["block_d"], plan["num_splits"]
    interpreter_bf16 = dtype == torch.bfloat16 and interp
    # fp32: ieee dots (no tf32 rounding). bf16 in the Triton interpreter (whose dot multiplies bf16 as
    # raw uint16): operands widened exactly to fp32 in the kernel.
    numerics = dict(DOT_PREC="ieee" if dtype == torch.float32 or interpreter_bf16 else "tf32",
                    DOT_UPCAST=interpreter_bf16)
    classes = dict(HEAD_DIM=head_dim, NUM_MOD=num_modalities, NUM_CLS=n_cls, NSP=nsp)
    scores = dict(CAUSAL=causal, WINDOW=window is not None, SOFTCAP=softcap, NEG_SCALE=neg_scale)
    balancing = dict(NUM_BAL=len(balance), MP=_next_pow2(num_modalities),
                     BY_CONTRIBUTION=balance_by == "contribution", HAS_QMASK=has_qmask,
                     RETURN_MASSES=return_masses)
    tau_head_stride = nsp if len(tables["tau"]) > 1 else 0  # per-head targets: one table row per head
    bh = batch * n_q_heads
    group = n_q_heads // n_kv_heads
    part_split = None
    if plan["mode"] == "decode" or splits > 1:  # partial states (B*Hq, splits, NSP, Lq[, BD]): max, sum, acc
        n_rows = bh * splits * nsp * len_q
        part_split = (n_rows, n_rows, n_rows * block_d)
        split_block = min(_next_pow2(splits), _MERGE_SPLIT_BLOCK)
        block_q = max(1, min(_next_pow2(len_q), _MERGE_TILE // (split_block * block_d)))
        merge = dict(
            merge_grid=(_cdiv(len_q, block_q), bh), merge_ints=(len_q, n_q_heads, splits),
            # Without an explicit ceiling ptxas caps this kernel lower (~64 registers) and spills a few
            # values; the hardware's 255 lets it keep them (checked in the kernel report, Triton 3.6 and 3.9).
            **_split("merge", ar_split_merge_kernel, dict(
                BLOCK_Q=block_q, SPLIT_BLOCK=split_block, BLOCK_D=block_d, num_warps=4, maxnreg=255,
                **balancing, **classes)))
    else:
        merge = {}
    if plan["mode"] == "decode":
        return _Launch(
            "decode", plan["grid"], tables,
            **_split("main", ar_decode_kernel, dict(
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=plan["num_warps"],
                num_stages=plan["num_stages"], **scores, **numerics, **classes)),
            main_ints=(len_q, len_k, n_q_heads, n_kv_heads, group, plan["key_start"], plan["keys_per_split"], splits),
            tau_head_stride=tau_head_stride, part_split=part_split, **merge)
    n_kblocks, n_prog = plan["n_kblocks"], plan["grid"][0]
    # One int32 buffer: key classes (B, n_kblocks * BN), block lists (B, C, n_kblocks), prefix counts.
    class_split = (batch * n_kblocks * block_n, batch * n_cls * n_kblocks, batch * n_cls * (n_kblocks + 1))
    # Per program: parked accumulators of all classes but the last one, and every class's max, sum
    # and accumulator norm.
    park_size = 0 if splits > 1 else n_prog * ((n_cls - 1) * block_d + 3 * n_cls) * block_m
    return _Launch(
        "prefill", plan["grid"], tables,
        **_split("main", ar_prefill_kernel, dict(
            SPLIT=splits > 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=plan["num_warps"],
            num_stages=plan["num_stages"], **scores, **balancing, **numerics, **classes)),
        main_ints=(len_q, len_k, n_q_heads, group, n_kblocks, plan["n_qblocks"], bh, plan["n_tiles"],
                   plan["blocks_per_split"], splits),
        tau_head_stride=tau_head_stride, part_split=part_split, class_split=class_split,
        **_split("classify", ar_classify_kernel, dict(
            NUM_MOD=num_modalities, NUM_CLS=n_cls, NSP=nsp, BLOCK_N=block_n, CHUNK=_CLASSIFY_CHUNK, num_warps=4)),
        park_size=park_size, **merge)


def ar_attention_fwd(q, k, v, key_modality, *, num_modalities, balance, target, strength, threshold,
                     modality_bias, causal, scale, query_mask, return_masses, window=None, softcap=None,
                     balance_by="mass", block_m=None, block_n=None, num_splits=None):
    """Runs the forward kernels; returns ``(o, masses)`` (masses None unless ``return_masses``)."""
    batch, n_q_heads, len_q, head_dim = q.shape
    n_kv_heads, len_k = k.shape[1], k.shape[2]
    device = q.device
    poison = poison_enabled()
    o = empty_output((batch, n_q_heads, len_q, head_dim), dtype=q.dtype, device=device, poison=poison)
    masses = empty_output((batch, n_q_heads, len_q, num_modalities), dtype=torch.float32, device=device,
                          poison=poison) if return_masses else None
    if batch * n_q_heads * len_q * head_dim == 0:
        return o, masses
    if len_k == 0:  # no query sees a key
        o.zero_()
        if masses is not None:
            masses.zero_()
        return o, masses

    # The kernels take any strides; a unit last stride keeps the loads coalesced.
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    balance = tuple(balance)
    split_rest = return_masses and num_modalities - len(balance) > 1  # rest masses per modality
    scale = float(scale)
    launch = _launch(batch, n_q_heads, n_kv_heads, len_q, len_k, head_dim, q.dtype, device, plan_facts(device),
                     num_modalities, balance, target, modality_bias, split_rest, causal, window,
                     softcap is not None, scale < 0, balance_by, query_mask is not None, return_masses,
                     block_m, block_n, num_splits)
    tables = launch.tables
    # Raw scores q.k inside the kernels; |scale| * log2(e) in the exponent, a negative scale negates q.
    # A zero scale (every score equal) runs as 1e-30: the same softmax to ~1e-26. With a softcap the
    # kernels compute softcap * tanh(|scale| * q.k / softcap), in natural units.
    qk_scale = abs(scale)
    c_log2 = LOG2E if softcap is not None else max(qk_scale * LOG2E, 1e-30)
    score_args = (window or 0, qk_scale, float(softcap or 1.0), c_log2)
    masses_arg = masses if masses is not None else o
    mass_strides = masses.stride() if masses is not None else (0, 0, 0, 0)
    if query_mask is not None:
        qmask, qmask_strides = query_mask.view(torch.uint8), query_mask.stride()
    else:
        qmask, qmask_strides = tables["class_of_mod_t"], (0, 0)  # a dummy pointer, never read
    if launch.part_split is not None:  # split-k partial states: max, sum, accumulator, in one allocation
        part_m, part_l, part_acc = empty_output((sum(launch.part_split),), dtype=torch.float32, device=device,
                                                poison=poison).split_with_sizes(launch.part_split)
    else:
        part_m = part_l = part_acc = o  # unused

    if launch.mode == "decode":
        ar_decode_kernel.run(
            q, k, v, key_modality, tables["class_of_mod_t"], part_m, part_l, part_acc,
            *q.stride(), *k.stride(), *v.stride(), *key_modality.stride(), *launch.main_ints, *score_args,
            *launch.main_const, grid=launch.grid, warmup=False, **launch.main_opts)
    else:
        key_cls, lists, pref = torch.empty(sum(launch.class_split), dtype=torch.int32,
                                           device=device).split_with_sizes(launch.class_split)
        n_kblocks = launch.main_ints[4]
        ar_classify_kernel.run(key_modality, tables["class_of_mod_t"], key_cls, lists, pref, *key_modality.stride(),
                               len_k, n_kblocks, *launch.classify_const, grid=(batch,), warmup=False,
                               **launch.classify_opts)
        park = torch.empty(launch.park_size, dtype=torch.float32, device=device) if launch.park_size else o
        ar_prefill_kernel.run(
            q, k, v, qmask, key_cls, lists, pref, tables["class_bias_t"], tables["tau_t"], tables["class_mod_t"],
            o, masses_arg, park, part_m, part_l, part_acc,
            *q.stride(), *k.stride(), *v.stride(), *qmask_strides, *o.stride(), *mass_strides,
            launch.tau_head_stride, *launch.main_ints, *score_args, float(strength), float(threshold),
            *launch.main_const, grid=launch.grid, warmup=False, **launch.main_opts)
    if launch.part_split is not None:
        ar_split_merge_kernel.run(
            part_m, part_l, part_acc, qmask, tables["class_bias_t"], tables["tau_t"], tables["class_mod_t"],
            o, masses_arg, *qmask_strides, *o.stride(), *mass_strides, launch.tau_head_stride, *launch.merge_ints,
            c_log2, float(strength), float(threshold), *launch.merge_const, grid=launch.merge_grid, warmup=False,
            **launch.merge_opts)
    return o, masses
