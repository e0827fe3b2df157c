"""The MoSE routing in one Triton kernel: a stable counting sort of token (and pair) ids by group.

Keys (``E**k`` with k = TOP_K; out-of-range ids never index anything):

- token key of token t with modality m in [0, M): ``m * E**k + e_0 [* E + e_1]``, an out-of-range
  expert id counting as expert 0 (the token stays with its modality; the kernels skip that choice);
  any other modality, or no expert id in range: ``M * E**k``, the last bucket (tokens without adapter
  sort last). For top-1 the token key is therefore the pair key, and the token order the pair order.
- pair key of pair ``t * k + j`` (only sorted for top-2: for top-1 pairs are tokens): ``m * E + e_j``,
  or ``M * E`` when the modality or the expert is out of range.

The key space is tiny (``M * E**k + 1`` buckets), so a counting sort replaces ``argsort``: every program
histograms *all* keys (the global bucket starts) and the keys before its own chunk (its offset in
each bucket), then places its chunk, ranking equal keys by position (stable: the same input gives
the same order, which keeps the deterministic backward bit-identical). No program waits for
another, so the grid is fixed by the shapes, nothing is read back by the host and the kernel can be
captured in a CUDA graph. The price is that every program reads all ``n`` ids: ``programs * n``
small loads served by L2. The launcher sizes chunks for two 1024-thread programs per SM (one
wave): at N = 8192, top-1, 264 programs read 8192 * 16 B each, ~35 MB from L2 (~5 us); the
scaling is quadratic in the sense ``programs * n``, so very large N (> 64K tokens per call) would be
better served by a separate histogram pass.

Outputs (int32): ``order`` (n,) item ids sorted by key, and ``offsets`` (n_keys + 2,): the start of each
bucket (the last bucket ``n_keys`` holds the items without adapter) and then n.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .interpreter_compat import install as _install_interpreter_fix

_install_interpreter_fix()


@triton.jit
def _route_keys(idx, valid, modality_ptr, expert_ptr, M, E, stride_mod, stride_en, stride_ek,
                TOP_K: tl.constexpr, IS_PAIR: tl.constexpr):
    """The sort key of items ``idx`` (tokens, or pairs ``t * TOP_K + j`` when IS_PAIR)."""
    if IS_PAIR:
        tok = idx // TOP_K
        choice = idx % TOP_K
    else:
        tok = idx
        choice = idx * 0
    mod = tl.load(modality_ptr + tok.to(tl.int64) * stride_mod, mask=valid, other=-1).to(tl.int32)
    adapted = (mod >= 0) & (mod < M)
    if IS_PAIR:
        e = tl.load(expert_ptr + tok.to(tl.int64) * stride_en + choice * stride_ek, mask=valid, other=-1)
        e = e.to(tl.int32)
        ok = adapted & (e >= 0) & (e < E)
        key = tl.where(ok, mod * E + e, M * E)
    else:
        key = mod
        n_buckets = M  # M * E**TOP_K once the loop is done: the key of "no adapter"
        any_valid = valid & False
        for j in tl.static_range(TOP_K):
            e = tl.load(expert_ptr + tok.to(tl.int64) * stride_en + j * stride_ek, mask=valid, other=0)
            e = e.to(tl.int32)
            e_valid = (e >= 0) & (e < E)
            any_valid = any_valid | e_valid
            key = key * E + tl.where(e_valid, e, 0)
            n_buckets = n_buckets * E
        key = tl.where(adapted & any_valid, key, n_buckets)
    return key


@triton.jit
def _sort_chunk(chunk, chunk_size, n_items, n_keys, order_ptr, offsets_ptr, modality_ptr, expert_ptr, M, E,
                stride_mod, stride_en, stride_ek,
                TOP_K: tl.constexpr, IS_PAIR: tl.constexpr, SUB: tl.constexpr, BINS: tl.constexpr,
                BLOCK_H: tl.constexpr):
    """Places items [chunk * chunk_size, (chunk + 1) * chunk_size) of one array at their sorted positions."""
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, n_items)
    hist_all = tl.zeros((BINS,), dtype=tl.int32)  # [BINS] every key
    hist_before = tl.zeros((BINS,), dtype=tl.int32)  # [BINS] keys of the items before this chunk
    offs_h = tl.arange(0, BLOCK_H)
    for i0 in range(0, n_items, BLOCK_H):
        idx = i0 + offs_h
        valid = idx < n_items
        key = _route_keys(idx, valid, modality_ptr, expert_ptr, M, E, stride_mod, stride_en, stride_ek,
                          TOP_K, IS_PAIR)
        hist_all += tl.histogram(key, BINS, mask=valid)
        hist_before += tl.histogram(key, BINS, mask=valid & (idx < start))
    starts = tl.cumsum(hist_all, 0) - hist_all  # [BINS] exclusive prefix: where each bucket begins
    base = starts + hist_before  # [BINS] where the next item of each bucket goes

    bins = tl.arange(0, BINS)
    for s0 in range(start, end, SUB):
        idx = s0 + tl.arange(0, SUB)
        valid = idx < end
        key = _route_keys(idx, valid, modality_ptr, expert_ptr, M, E, stride_mod, stride_en, stride_ek,
                          TOP_K, IS_PAIR)
        onehot = (key[:, None] == bins[None, :]) & valid[:, None]  # [SUB, BINS]
        running = tl.cumsum(onehot.to(tl.int32), 0)  # [SUB, BINS] inclusive count of each key so far
        rank = tl.sum(tl.where(onehot, running, 0), 1) - 1  # [SUB] rank among equal keys (stable)
        pos = tl.sum(tl.where(onehot, base[None, :], 0), 1) + rank  # [SUB]
        tl.store(order_ptr + pos, idx, mask=valid)
        base += tl.sum(onehot.to(tl.int32), 0)
    if chunk == 0:  # bucket starts; bins above n_keys are empty, so starts[n_keys + 1] == n_items
        tl.store(offsets_ptr + bins, starts, mask=bins <= n_keys + 1)


@triton.jit
def mose_route_kernel(
    modality_ptr, expert_ptr, order_ptr, offsets_ptr, pair_order_ptr, pair_offsets_ptr,
    N, M, E, stride_mod, stride_en, stride_ek, chunk_size, n_token_chunks,
    TOP_K: tl.constexpr, SORT_PAIRS: tl.constexpr, SUB: tl.constexpr, BINS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Token sort (programs [0, n_token_chunks)) and, with SORT_PAIRS, pair sort (the programs after),
    ``chunk_size`` items per program, placed SUB at a time.

    grid (max(1, n_token_chunks) [+ cdiv(N * TOP_K, chunk_size)],): program 0 also writes the
    offsets, so they exist even for N = 0. BINS (a power of two) must exceed ``M * E**TOP_K + 1``.
    """
    pid = tl.program_id(0)
    if pid < n_token_chunks or pid == 0:
        n_keys = M
        for _ in tl.static_range(TOP_K):
            n_keys = n_keys * E
        _sort_chunk(pid, chunk_size, N, n_keys, order_ptr, offsets_ptr, modality_ptr, expert_ptr, M, E,
                    stride_mod, stride_en, stride_ek, TOP_K, False, SUB, BINS, BLOCK_H)
    if SORT_PAIRS:
        if pid >= n_token_chunks:
            _sort_chunk(pid - n_token_chunks, chunk_size, N * TOP_K, M * E, pair_order_ptr, pair_offsets_ptr,
                        modality_ptr, expert_ptr, M, E, stride_mod, stride_en, stride_ek,
                        TOP_K, True, SUB, BINS, BLOCK_H)
