"""Launchers of the MoSE Triton kernels: routing, block sizes, splits, grids, allocation. No autograd.

Nothing here reads a device value on the host: the routing is sorted on the device by one kernel,
grids and splits depend on shapes only, and kernels exit early (or loop zero times) on what a block
does not hold, so a forward or backward call can be captured in a CUDA graph. Host arithmetic is
plain integer arithmetic (``-(-a // b)``; ``triton.cdiv`` costs microseconds from Python), and the
forward's plans (grids, splits, constexprs) are cached per shape (``_route_plan``, ``_shrink_plan``,
``_expand_plan``), so a forward call allocates and launches only (``python -m bench.host_overhead``).

Passes of one training step (see triton_kernels.py for each kernel):

    forward     route -> shrink (reads x) -> expand (reads out or a bias, writes y; stores h)
    backward    dy pass (reads dy: dh, dgate terms, and dB by atomics)
                -> x pass (reads x: dA by atomics; writes dx and dgate)
                deterministic: the dy and x passes without atomics, then per-group reductions of
                dA (reads x again) and dB (reads dy again) into partials summed in a fixed order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..alloc import empty_output
from ..launching import positional_constexprs
from ..target import interpreted, multiprocessor_count, plan_facts
from .triton_kernels import (
    mose_dy_kernel,
    mose_expand_kernel,
    mose_shrink_kernel,
    mose_wgrad_A_kernel,
    mose_wgrad_B_kernel,
    mose_x_kernel,
)
from .triton_routing import mose_route_kernel

# Warps of the row kernels (tiles of BLOCK_T = 64 rows): 4 (one warpgroup) up to r = 32, so the
# 64-row wgmma is not computed twice by two warpgroups; 8 above, where 4 warps spill registers in the
# dy pass on sm_90a (the kernel report lists both).
NUM_WARPS = 8


def row_warps(block_r: int) -> int:
    return 4 if block_r <= 32 else 8
# The routing kernel: 32 warps (1024 threads), so 2 programs fill an SM and its redundant key reads
# (every program histograms all keys) are shared by as few programs as fill the GPU.
ROUTE_WARPS = 32
ROUTE_PROGRAMS_PER_SM = 2
# Streaming kernels are split until they launch about this many programs per SM (occupancy of these
# kernels on sm_90a is 3-6 programs per SM; see the kernel report), so even small N fills the GPU.
PROGRAMS_PER_SM = 4
# SM count assumed where there is no CUDA device (the interpreter): an H100 SXM's, so CPU tests
# exercise the same splits as the GPU presets.
DEFAULT_SMS = 132


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def sm_count(device: torch.device) -> int:
    """SMs to fill (``kernels.target``: the device's, or the H100's inside ``target.pretend()``); under
    the interpreter DEFAULT_SMS, so CPU tests plan the same splits as the GPU presets."""
    count = multiprocessor_count(device)
    return DEFAULT_SMS if count is None else count


def _facts_sms(facts) -> int:
    """``sm_count`` from ``target.plan_facts``."""
    return DEFAULT_SMS if facts[1] is None else facts[1]


def numerics_mode(dtype: torch.dtype, device: torch.device) -> int:
    """The kernels' NUMERICS (see triton_kernels._dot): fp32 inputs get IEEE fp32 dots (the float32
    tolerance, 1e-5, is below tf32's precision); bf16 and fp16 on the CPU (the interpreter) get the
    interpreter work-arounds: its dot of half-precision operands accumulates in half precision
    (an fp16 ``A x`` above 65504 overflows where the tensor cores' fp32 accumulator does not)."""
    return _numerics(dtype, interpreted(device))


def _numerics(dtype: torch.dtype, interp: bool) -> int:
    if dtype == torch.float32:
        return 1
    if dtype in (torch.bfloat16, torch.float16) and interp:
        return 2
    return 0


def launch(kernel, grid, *args, num_warps: int = NUM_WARPS, **kwargs) -> None:
    if all(g > 0 for g in grid):  # an empty grid is not a valid launch
        kernel[grid](*args, num_warps=num_warps, **kwargs)


@dataclass(frozen=True)
class _Kernel:
    """One planned launch: its grid (None when a dimension is 0: an empty grid is not a valid launch),
    the integer arguments that depend on the plan, the constexprs (positional, see ``launching``)
    and the launch options."""

    grid: tuple | None
    ints: tuple
    const: tuple
    opts: dict


def _planned(kernel, grid: tuple, ints: tuple, **kw) -> _Kernel:
    return _Kernel(grid if all(g > 0 for g in grid) else None, ints, *positional_constexprs(kernel, kw))


# ------------------------------------------------------------------------------------------------
# Block sizes and splits
# ------------------------------------------------------------------------------------------------


def rank_block(rank: int) -> int:
    """tl.dot needs every dimension >= 16: the rank is padded (and masked) to a power of two >= 16."""
    return max(16, _pow2_at_least(rank))


def token_block(n_tokens: int) -> int:
    return max(16, min(64, _pow2_at_least(n_tokens)))


def feature_block(d: int, widest: int = 64) -> int:
    """Width of a d_in / d_out tile: ``widest``, and at most half of d rounded up to a power of two,
    so that small shapes still have several tiles (and their tails).

    64 by default: the kernels whose loop writes or accumulates a [BLOCK_T, BLOCK] fp32 tile per step
    (expand, x pass) or holds a [BLOCK, BLOCK_R] one (dy pass) need 160-240 registers at 128 on
    sm_90a (occupancy 1, spills at r = 64); the shrink only accumulates [BLOCK_T, BLOCK_R] and reads
    128 columns per step at r <= 32 (the kernel report lists each choice).
    """
    return max(16, min(widest, _pow2_at_least(d) // 2))


def feature_splits(n_blocks: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """``(n_splits, tiles_per_split)`` for a kernel that streams ``n_tiles`` feature tiles per block
    of tokens: enough splits that ``n_blocks * n_splits`` reaches PROGRAMS_PER_SM programs per SM."""
    return _feature_splits(n_blocks, n_tiles, sm_count(device))


def _feature_splits(n_blocks: int, n_tiles: int, n_sm: int) -> tuple[int, int]:
    target = PROGRAMS_PER_SM * n_sm
    wanted = max(1, min(n_tiles, _cdiv(target, max(1, n_blocks))))
    per_split = max(1, n_tiles // wanted)  # rounded down: at least `wanted` splits
    return _cdiv(n_tiles, per_split), per_split


def reduction_splits(n_rows: int, n_programs: int, block_t: int, device: torch.device) -> int:
    """How many programs share one bucket's rows in a deterministic weight-gradient reduction:
    enough to fill the GPU, each still with a few blocks of rows (shapes only, no look at the
    bucket sizes, which would need a sync)."""
    if n_rows == 0:
        return 1
    by_fill = _cdiv(4 * PROGRAMS_PER_SM * sm_count(device), max(1, n_programs))  # these run up to 9 per SM
    by_rows = max(1, n_rows // (4 * block_t))
    return max(1, min(16, by_fill, by_rows))


# ------------------------------------------------------------------------------------------------
# Routing
# ------------------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class MoseRouting:
    """One call's routing in the layout the kernels read (built once in the forward, reused by the
    backward). ``modality`` and ``expert`` are the caller's tensors (any integer dtype and strides)."""

    order: torch.Tensor  # (N,) int32 token ids sorted by (modality, expert_0[, expert_1]); no adapter last
    offsets: torch.Tensor  # (M * E**k + 2,) int32 bucket starts in `order`; modality m: offsets[m * E**k]
    pair_order: torch.Tensor | None  # (N * k,) int32 pair ids t * k + j sorted by group m * E + e_j
    pair_offsets: torch.Tensor | None  # (M * E + 2,) int32 group starts in `pair_order`
    modality: torch.Tensor
    expert: torch.Tensor
    n_modalities: int
    n_experts: int
    id_strides: tuple = ()  # (modality.stride(0), expert.stride(0), expert.stride(1)), as the kernels read them

    def __post_init__(self):
        if not self.id_strides:
            self.id_strides = (self.modality.stride(0), *self.expert.stride())

    @property
    def top_k(self) -> int:
        return self.expert.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.order.shape[0]

    @property
    def modality_stride(self) -> int:
        """Buckets per modality in ``offsets``: modality m's tokens start at offsets[m * modality_stride]."""
        return self.n_experts ** self.top_k


@functools.lru_cache(maxsize=1024)
def _route_plan(n_tokens: int, top_k: int, n_modalities: int, n_experts: int, sort_pairs: bool, facts) -> tuple:
    """``(buffer sizes, kernel)`` of ``route`` for plain ints; cached."""
    n_token_keys = n_modalities * n_experts ** top_k
    n_pair_keys = n_modalities * n_experts
    bins = _pow2_at_least(n_token_keys + 2)  # + the bucket "no adapter" + one empty bin (the end)
    # chunk: items per program, so that the programs of both sorts make ROUTE_PROGRAMS_PER_SM per SM
    # (the interpreter runs programs one after another: there, at least 32 items per program)
    n_items = n_tokens + (n_tokens * top_k if sort_pairs else 0)
    min_chunk = 32 if facts[0] else 1
    chunk = max(min_chunk, n_items // (ROUTE_PROGRAMS_PER_SM * _facts_sms(facts)))
    sub = max(1, min(_pow2_at_least(chunk), 4096 // bins))  # the [SUB, BINS] one-hot tile: <= 4 per thread
    n_token_chunks = _cdiv(n_tokens, chunk)
    n_pair_chunks = _cdiv(n_tokens * top_k, chunk) if sort_pairs else 0
    sizes = (n_tokens, n_token_keys + 2) + ((n_tokens * top_k, n_pair_keys + 2) if sort_pairs else ())
    grid = (max(1, n_token_chunks) + n_pair_chunks,)
    return sizes, _planned(mose_route_kernel, grid, (chunk, n_token_chunks), TOP_K=top_k, SORT_PAIRS=sort_pairs,
                           SUB=sub, BINS=bins, BLOCK_H=32 * ROUTE_WARPS * 4, num_warps=ROUTE_WARPS)


def route(modality, expert, n_modalities: int, n_experts: int, *, sort_pairs: bool) -> MoseRouting:
    """Sorts token ids (and, with ``sort_pairs`` and top-2, pair ids) by group in one kernel.

    Pairs are only needed by the deterministic dB reduction; for top-1 they are the tokens.
    """
    n_tokens, top_k = expert.shape
    device = expert.device
    sort_pairs = sort_pairs and top_k == 2
    sizes, kernel = _route_plan(n_tokens, top_k, n_modalities, n_experts, sort_pairs, plan_facts(device))
    parts = torch.empty(sum(sizes), dtype=torch.int32, device=device).split_with_sizes(sizes)
    order, offsets = parts[0], parts[1]
    pair_order, pair_offsets = (parts[2], parts[3]) if sort_pairs else (order, offsets)
    id_strides = (modality.stride(0), *expert.stride())
    if kernel.grid is not None:
        mose_route_kernel.run(modality, expert, order, offsets, pair_order, pair_offsets,
                              n_tokens, n_modalities, n_experts, *id_strides, *kernel.ints,
                              *kernel.const, grid=kernel.grid, warmup=False, **kernel.opts)
    if not sort_pairs and top_k == 2:  # pairs are only sorted for the deterministic dB reduction
        pair_order = pair_offsets = None
    return MoseRouting(order, offsets, pair_order, pair_offsets, modality, expert, n_modalities, n_experts,
                       id_strides)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _shrink_plan(n_tokens: int, d_in: int, rank: int, dtype: torch.dtype, facts) -> _Kernel:
    block_r, block_t = rank_block(rank), token_block(n_tokens)
    block_k = feature_block(d_in, 128 if block_r <= 32 else 64)
    n_blocks = _cdiv(n_tokens, block_t)
    n_splits, per_split = _feature_splits(n_blocks, _cdiv(d_in, block_k), _facts_sms(facts))
    return _planned(mose_shrink_kernel, (n_blocks, n_splits), (per_split * block_k,), BLOCK_T=block_t, BLOCK_K=block_k,
                    BLOCK_R=block_r, NUMERICS=_numerics(dtype, facts[0]), num_warps=row_warps(block_r))


def shrink(x, routing: MoseRouting, A):
    """Partial down-projections hp (n_splits, N, r) fp32: their sum over splits is h = A[m] x."""
    n_tokens, d_in = x.shape
    rank = A.shape[1]
    kernel = _shrink_plan(n_tokens, d_in, rank, x.dtype, plan_facts(x.device))
    n_splits = kernel.grid[1] if kernel.grid is not None else 1
    hp = torch.empty(n_splits, n_tokens, rank, dtype=torch.float32, device=x.device)
    if kernel.grid is not None:
        mose_shrink_kernel.run(
            x, A, hp, routing.order, routing.modality, n_tokens, d_in, rank, routing.n_modalities, *kernel.ints,
            routing.id_strides[0], *x.stride(), *A.stride(), *hp.stride()[:2], *kernel.const,
            grid=kernel.grid, warmup=False, **kernel.opts)
    return hp


@functools.lru_cache(maxsize=1024)
def _expand_plan(n_tokens: int, d_out: int, rank: int, top_k: int, dtype: torch.dtype, facts, has_base: bool,
                 only_adapted_rows: bool, save_h: bool, update_norm: bool) -> _Kernel:
    block_r, block_t = rank_block(rank), token_block(n_tokens)
    block_n = feature_block(d_out)
    n_blocks = _cdiv(n_tokens, block_t)
    n_splits, per_split = _feature_splits(n_blocks, _cdiv(d_out, block_n), _facts_sms(facts))
    return _planned(mose_expand_kernel, (n_blocks, n_splits), (per_split * block_n,), TOP_K=top_k, HAS_BASE=has_base,
                    ONLY_ADAPTED_ROWS=only_adapted_rows, WRITE_H=save_h, WRITE_NORM=update_norm, BLOCK_T=block_t,
                    BLOCK_N=block_n, BLOCK_R=block_r, NUMERICS=_numerics(dtype, facts[0]),
                    **_expand_options(block_r, dtype))


def _expand_options(block_r: int, dtype: torch.dtype) -> dict:
    """fp32 tiles are IEEE FMA loops, not tensor-core dots: each thread holds its rows of the
    [BLOCK_T, BLOCK_R] operand and its columns of the [BLOCK_R, BLOCK_N] B tile in registers, which
    with 4 warps spills (64 B under Triton 3.6, sm_90a); 8 warps and 2 stages hold them (126-128
    registers, 2 programs per SM, no spills; the kernel report checks it)."""
    if dtype == torch.float32:
        return dict(num_warps=8, num_stages=2)
    return dict(num_warps=row_warps(block_r))


def expand(hp, routing: MoseRouting, gate, B, scale_vec, base, y, *, only_adapted_rows=False, save_h=False,
           update_norm=False):
    """Writes ``y = base + scale_m * update`` (base: ``out`` (N, d_out), a bias (d_out,), or None for 0).

    Returns ``(y, h, norm)``: h (N, r) fp32 when ``save_h``; norm (N,) fp32, the L2 norm of each
    token's update before scale, when ``update_norm``. ``only_adapted_rows``: rows without adapter
    are left untouched (in place, y is base).
    """
    n_hp_splits, n_tokens, rank = hp.shape
    d_out = B.shape[2]
    device = hp.device
    kernel = _expand_plan(n_tokens, d_out, rank, routing.expert.shape[1], B.dtype, plan_facts(device),
                          base is not None, only_adapted_rows, save_h, update_norm)
    n_splits = kernel.grid[1] if kernel.grid is not None else 1
    h = torch.empty(n_tokens, rank, dtype=torch.float32, device=device) if save_h else hp
    norm_sq = torch.empty(n_splits, n_tokens, dtype=torch.float32, device=device) if update_norm else hp
    if base is None:
        base_strides = (0, 0)
    elif base.dim() == 1:  # a bias: every row reads the same vector
        base_strides = (0, base.stride(0))
    else:
        base_strides = base.stride()
    if kernel.grid is not None:
        mose_expand_kernel.run(
            hp, B, base if base is not None else y, y, h, norm_sq, routing.order, routing.modality,
            routing.expert, gate, scale_vec,
            n_tokens, d_out, rank, routing.n_modalities, routing.n_experts, n_hp_splits, *kernel.ints,
            *routing.id_strides, *gate.stride(), *hp.stride()[:2], *B.stride(), *base_strides, *y.stride(),
            h.stride(0), norm_sq.stride(0), *kernel.const, grid=kernel.grid, warmup=False, **kernel.opts)
    norm = norm_sq.sum(0).sqrt_() if update_norm else None  # the splits in a fixed order (deterministic)
    return y, (h if save_h else None), norm


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


def dy_pass(dy, h, routing: MoseRouting, gate, B, scale_vec, dB_acc=None):
    """``(dhp, qp)``: partial (before scale) dh (S, N, r) and partial h . g_j (S, N, k), both fp32;
    with ``dB_acc`` (an fp32 (M, E, d_out, r) buffer of zeros) also dB by atomics from the same dy."""
    n_tokens, rank = h.shape
    d_out = dy.shape[1]
    device = dy.device
    block_r, block_t = rank_block(rank), token_block(n_tokens)
    block_n = feature_block(d_out)
    n_blocks = _cdiv(n_tokens, block_t)
    n_splits, per_split = feature_splits(n_blocks, _cdiv(d_out, block_n), device)
    top_k = routing.top_k
    partials = torch.empty(n_splits, n_tokens, rank + top_k, dtype=torch.float32, device=device)
    dhp, qp = partials[..., :rank], partials[..., rank:]
    fuse_db = dB_acc is not None
    db = dB_acc if fuse_db else partials
    db_strides = (db.stride(0), db.stride(1), db.stride(2), db.stride(3)) if fuse_db else (0, 0, 0, 0)
    launch(mose_dy_kernel, (n_blocks, n_splits),
           dy, h, B, dhp, qp, db, routing.order, routing.modality, routing.expert, gate, scale_vec,
           n_tokens, d_out, rank, routing.n_modalities, routing.n_experts, per_split * block_n,
           routing.modality.stride(0), routing.expert.stride(0), routing.expert.stride(1), gate.stride(0),
           gate.stride(1), dy.stride(0), dy.stride(1), h.stride(0), B.stride(0), B.stride(1), B.stride(2),
           B.stride(3), dhp.stride(0), dhp.stride(1), qp.stride(0), qp.stride(1), *db_strides,
           TOP_K=top_k, FUSE_DB=fuse_db, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r,
           NUMERICS=numerics_mode(dy.dtype, device), num_warps=row_warps(block_r))
    return dhp, qp


def x_pass(x, A, dhp, qp, routing: MoseRouting, scale_vec, *, dx=None, dA_acc=None, dh=None, dgate=None):
    """Consumes the dy pass: writes ``dx`` (A[m]^T dh, 0 without adapter), adds dA into ``dA_acc``
    (fp32 atomics, x read once), writes ``dh`` (fp32) and ``dgate``; each only when given."""
    n_tokens, d_in = x.shape
    rank = A.shape[1]
    device = x.device
    block_r, block_t = rank_block(rank), token_block(n_tokens)
    block_k = feature_block(d_in)
    n_blocks = _cdiv(n_tokens, block_t)
    if dx is not None or dA_acc is not None:
        n_splits, per_split = feature_splits(n_blocks, _cdiv(d_in, block_k), device)
    else:  # only dgate / dh: one program per block, no pass over x
        n_splits, per_split = 1, 0
    unused = dhp
    dxs = (dx.stride(0), dx.stride(1)) if dx is not None else (0, 0)
    das = (dA_acc.stride(0), dA_acc.stride(1), dA_acc.stride(2)) if dA_acc is not None else (0, 0, 0)
    dgs = (dgate.stride(0), dgate.stride(1)) if dgate is not None else (0, 0)
    launch(mose_x_kernel, (n_blocks, n_splits),
           x, A, dhp, qp, dx if dx is not None else unused, dA_acc if dA_acc is not None else unused,
           dh if dh is not None else unused, dgate if dgate is not None else unused, routing.order,
           routing.modality, routing.expert, scale_vec,
           n_tokens, d_in, rank, routing.n_modalities, routing.n_experts, dhp.shape[0], per_split * block_k,
           routing.modality.stride(0), routing.expert.stride(0), routing.expert.stride(1), x.stride(0), x.stride(1),
           A.stride(0), A.stride(1), A.stride(2), dhp.stride(0), dhp.stride(1), qp.stride(0), qp.stride(1),
           *dxs, *das, dh.stride(0) if dh is not None else 0, *dgs,
           TOP_K=routing.top_k, WRITE_DX=dx is not None, FUSE_DA=dA_acc is not None, WRITE_DH=dh is not None,
           WRITE_DGATE=dgate is not None, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_R=block_r,
           NUMERICS=numerics_mode(x.dtype, device), num_warps=row_warps(block_r))


def wgrad_A(x, dh, routing: MoseRouting, out):
    """Deterministic dA (M, r, d_in) into ``out`` (contiguous, any float dtype): per-modality
    reductions of dh x^T split over programs, the splits summed in order."""
    n_tokens, d_in = x.shape
    rank, n_modalities = dh.shape[1], routing.n_modalities
    device = x.device
    block_r, block_t = rank_block(rank), token_block(n_tokens)
    block_k = feature_block(d_in)
    n_tiles = _cdiv(d_in, block_k)
    splits = reduction_splits(n_tokens // max(1, n_modalities), n_modalities * n_tiles, block_t, device)
    partials = torch.empty(splits, n_modalities, rank, d_in, dtype=torch.float32, device=device)
    launch(mose_wgrad_A_kernel, (n_modalities, n_tiles, splits),
           x, dh, partials, routing.order, routing.offsets,
           d_in, rank, splits, routing.modality_stride,
           x.stride(0), x.stride(1), dh.stride(0), *partials.stride(),
           BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_R=block_r, NUMERICS=numerics_mode(x.dtype, device),
           num_warps=row_warps(block_r))
    return out.copy_(partials.sum(0).view_as(out))  # the splits in a fixed order, cast to out's dtype


def wgrad_B(dy, h, routing: MoseRouting, gate, scale_vec, out):
    """Deterministic dB (M, E, d_out, r) into ``out`` (contiguous): per-group reductions of
    scale gate dy h^T over the group's pairs, split over programs, the splits summed in order."""
    n_tokens, rank = h.shape
    d_out = dy.shape[1]
    n_groups = routing.n_modalities * routing.n_experts
    device = dy.device
    block_r, block_t = rank_block(rank), token_block(n_tokens)
    block_n = feature_block(d_out)
    n_tiles = _cdiv(d_out, block_n)
    splits = reduction_splits(n_tokens * routing.top_k // max(1, n_groups), n_groups * n_tiles, block_t, device)
    partials = torch.empty(splits, n_groups, d_out, rank, dtype=torch.float32, device=device)
    launch(mose_wgrad_B_kernel, (n_groups, n_tiles, splits),
           dy, h, partials, routing.pair_order, routing.pair_offsets, gate, scale_vec,
           d_out, rank, routing.n_experts, splits,
           gate.stride(0), gate.stride(1), dy.stride(0), dy.stride(1), h.stride(0), *partials.stride(),
           TOP_K=routing.top_k, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r,
           NUMERICS=numerics_mode(dy.dtype, device), num_warps=row_warps(block_r))
    return out.copy_(partials.sum(0).view_as(out))  # the splits in a fixed order, cast to out's dtype


def adapter_backward(dy, x, h, routing: MoseRouting, gate, A, B, scale_vec, *, need_dx: bool, need_dgate: bool,
                     need_dA: bool, need_dB: bool, deterministic: bool):
    """Gradients ``(dx, dgate, dA, dB)`` of the adapter (dx: A[m]^T dh only, in x's dtype; dgate in
    gate's dtype; dA, dB in A's); None where not needed.

    Default: dy is read once (dh, dgate terms and dB by atomics) and x once (dx, and dA by atomics).
    ``deterministic``: no atomics; dA and dB come from per-group reductions (x and dy read a second
    time) summed in a fixed order, so two runs are bit-identical.
    """
    device = dy.device
    n_tokens = dy.shape[0]
    dx = dgate = dA = dB = None
    fuse = not deterministic
    grads = torch.empty(A.numel() * need_dA + B.numel() * need_dB, dtype=A.dtype, device=device)
    if need_dA:
        dA = grads[:A.numel()].view(A.shape)
    if need_dB:
        dB = grads[grads.numel() - B.numel():].view(B.shape)
    if fuse and (need_dA or need_dB):
        acc = torch.zeros(grads.numel(), dtype=torch.float32, device=device)
        dA_acc = acc[:A.numel()].view(A.shape) if need_dA else None
        dB_acc = acc[acc.numel() - B.numel():].view(B.shape) if need_dB else None
    else:
        dA_acc = dB_acc = None

    if need_dx or need_dA or need_dgate or (fuse and need_dB):
        dhp, qp = dy_pass(dy, h, routing, gate, B, scale_vec, dB_acc=dB_acc)
        if need_dx:
            dx = empty_output(tuple(x.shape), dtype=x.dtype, device=device)
        if need_dgate:
            dgate = empty_output((n_tokens, routing.top_k), dtype=gate.dtype, device=device)
        dh = torch.empty(n_tokens, A.shape[1], dtype=torch.float32, device=device) if need_dA and not fuse else None
        if need_dx or need_dA or need_dgate:
            x_pass(x, A, dhp, qp, routing, scale_vec, dx=dx, dA_acc=dA_acc, dh=dh, dgate=dgate)
        if dh is not None:
            wgrad_A(x, dh, routing, dA)
    if need_dB and not fuse:
        wgrad_B(dy, h, routing, gate, scale_vec, dB)
    if fuse and (need_dA or need_dB):
        grads.copy_(acc)  # the fp32 atomics' sums cast to the parameters' dtype
    return dx, dgate, dA, dB
