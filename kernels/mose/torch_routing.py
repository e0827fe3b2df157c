"""Routing of the MoSE PyTorch backend: which rows each matmul reads, computed once per call.

Groupings of tokens: by modality (the shrink ``h = A[m] x`` and its gradients dA, dx) and, for
each choice j of the top-k, by ``(modality, expert_j)`` (the expand and its gradients dB, dh,
dgate). Rows without adapter (modality -1) are in no group.

A grouping keeps the rows **in place** when they already form few contiguous runs of one key --
the usual audio-visual prompt (text, a visual span, an audio span, text) for the modalities,
sequence routing (a (sample, modality) span shares its experts) for the choices: every matmul then
reads and writes slices, nothing is copied. Otherwise it **sorts** the token ids once (stable);
its matmuls read their rows gathered by ``index_select`` and results return with ``index_add_``,
one op per chunk of at most ``CHUNK_BYTES``, gathered just before and scattered just after its
matmuls: the chunk stays in cache, and a temporary that small is recycled by malloc where a large
one may be mapped afresh and page-fault on every call. Few chunks keep the op count low: every
tensor op costs microseconds, which matter next to a small layer.
When the tokens must be sorted, they follow choice 0's order (its groups refine the modalities'),
so top-1 sorts once and never reorders ``h``.

Group bounds are read on the host: free on the CPU, a synchronisation on CUDA (which is why CUDA
tensors go to the Triton backend by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A grouping stays in place when its runs are at least this long on average, or no more numerous
# than the keys (so never more matmuls than the sorted form). Measured on the CPU (mose_linear,
# N=512, d=512, one thread, runs of one (modality, expert)): sorting wins at 4-row runs, the two
# break even between 16 and 32, in place wins at 64.
MIN_MEAN_RUN = 32
# Sorted rows are gathered, and products scattered, in chunks of at most this many bytes (see the
# module docstring). Measured (mose_linear, one thread, process CPU time, min of 12-40 interleaved
# rounds): N=512, d=512 fwd_bwd 1.65x F.linear at 512 KiB, 1.55-1.59x at 1 MiB, 1.63x at 2 MiB;
# N=2048, d=1024 fwd 1.13x at 1 MiB, 1.18x at 2 MiB, 1.23x at 8 MiB (one chunk: all rows at once).
CHUNK_BYTES = 1 << 20


def chunk_rows(row_bytes: int) -> int:
    """Rows per chunk of a sorted grouping."""
    return max(1, CHUNK_BYTES // max(row_bytes, 1))


def keeps_in_place(n_runs: int, n_keys: int, n_rows: int) -> bool:
    """Whether ``n_rows`` rows in ``n_runs`` runs of ``n_keys`` possible keys stay in place."""
    return n_runs <= n_keys or n_runs * MIN_MEAN_RUN <= n_rows


@dataclass(frozen=True)
class Grouping:
    """Tokens grouped by key: segment i holds ``sizes[i]`` rows of key ``keys[i]``.

    In place (``rows`` None): segment i is tokens ``starts[i] .. starts[i] + sizes[i]`` and a
    tensor "in this grouping's order" is in token order. Sorted: ``rows`` (n_kept,) lists the token
    ids in grouped order and segment i is positions ``starts[i] ..`` of it. The positions form
    chunks of at most ``chunk_rows(row_bytes)`` rows (``chunk_ids[c]``: their token ids,
    ``chunk_sizes[c]``: the sizes of the segments in chunk c); a segment never crosses a chunk
    boundary, so a key may span several segments. Each chunk is gathered, and its products
    scattered, by one op.
    """

    keys: tuple[int, ...]
    sizes: tuple[int, ...]
    starts: tuple[int, ...]
    rows: torch.Tensor | None
    chunk_ids: tuple[torch.Tensor, ...] = ()
    chunk_sizes: tuple[tuple[int, ...], ...] = ()

    @property
    def in_place(self) -> bool:
        return self.rows is None

    def parts(self, t: torch.Tensor):
        """Per-segment views of ``t`` (dim 0 in this grouping's order)."""
        if self.rows is None:
            return [t[start:start + size] for start, size in zip(self.starts, self.sizes, strict=True)]
        return t.split(self.sizes)

    def takes(self, t: torch.Tensor):
        """Each segment's rows of ``t`` (dim 0: tokens), in order: slices in place, else gathered
        lazily, one chunk at a time, just before use."""
        if self.rows is None:
            return self.parts(t)
        return (part for ids, sizes in zip(self.chunk_ids, self.chunk_sizes, strict=True)
                for part in t.index_select(0, ids).split(sizes))

    def add_matmuls(self, dst: torch.Tensor, factors) -> None:
        """``dst[rows of segment i] += a_i @ b_i`` in place for ``factors`` = ((a_0, b_0), ...), one
        pair per segment (dst: tokens on dim 0)."""
        factors = iter(factors)
        if self.rows is None:
            for part in self.parts(dst):
                a, b = next(factors)
                part.addmm_(a, b)
            return
        for ids, sizes in zip(self.chunk_ids, self.chunk_sizes, strict=True):
            products = dst.new_empty(ids.shape[0], dst.shape[1])
            for part in products.split(sizes):
                a, b = next(factors)
                torch.mm(a, b, out=part)
            dst.index_add_(0, ids, products)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (dim 0: tokens) in this grouping's order."""
        return t if self.rows is None else t.index_select(0, self.rows)

    def scatter(self, t: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """``t`` (dim 0 in this grouping's order) in token order; 0 for rows in no group."""
        if self.rows is None:
            return t
        return t.new_zeros((n_tokens,) + tuple(t.shape[1:])).index_copy_(0, self.rows, t)

    def same_order(self, other: Grouping) -> bool:
        return self.rows is other.rows  # both in place, or sorted by the one shared index


def _runs(values: torch.Tensor, counts: torch.Tensor):
    keys, sizes = values.tolist(), counts.tolist()
    starts, start = [], 0
    for size in sizes:
        starts.append(start)
        start += size
    return keys, sizes, starts


def group_tokens(keys: torch.Tensor, n_keys: int, *, row_bytes: int = 0, may_sort: bool = True) -> Grouping | None:
    """Groups the tokens by ``keys`` (N,) int64 in [-1, n_keys); -1 is left out. ``row_bytes``: the
    widest row a matmul gathers or scatters. None when the groups are not in place and ``may_sort``
    is False."""
    values, counts = torch.unique_consecutive(keys, return_counts=True)
    if keeps_in_place(values.shape[0], n_keys, keys.numel()):
        rows = None
    elif not may_sort:
        return None
    else:
        keys, rows = torch.sort(keys, stable=True)
        values, counts = torch.unique_consecutive(keys, return_counts=True)
    runs = _runs(values, counts)
    kept = [i for i, key in enumerate(runs[0]) if key >= 0]
    keys_kept, sizes, starts = ([run[i] for i in kept] for run in runs)
    if rows is not None and len(kept) < len(runs[0]):  # sorted: the -1 group comes first
        skipped = runs[1][0]
        rows = rows[skipped:]
        starts = [s - skipped for s in starts]
    if rows is None:
        return Grouping(tuple(keys_kept), tuple(sizes), tuple(starts), None)
    return _chunked(keys_kept, sizes, rows, chunk_rows(row_bytes))


def _chunked(keys, sizes, rows: torch.Tensor, max_rows: int) -> Grouping:
    """A sorted grouping of segments (keys, sizes) that follow each other over ``rows``, split at
    every multiple of ``max_rows`` positions into chunks."""
    seg_keys, seg_sizes, seg_starts, chunk_sizes = [], [], [], []
    start = 0
    for key, size in zip(keys, sizes, strict=True):
        end = start + size
        while start < end:
            piece = min(end, (start // max_rows + 1) * max_rows) - start
            if start % max_rows == 0:
                chunk_sizes.append([])
            seg_keys.append(key), seg_sizes.append(piece), seg_starts.append(start)
            chunk_sizes[-1].append(piece)
            start += piece
    chunk_ids = tuple(rows.split([sum(c) for c in chunk_sizes]))
    return Grouping(tuple(seg_keys), tuple(seg_sizes), tuple(seg_starts), rows, chunk_ids,
                    tuple(tuple(c) for c in chunk_sizes))


def coarsen(grouping: Grouping, divisor: int, max_rows: int) -> Grouping:
    """The same rows keyed by ``key // divisor``: adjacent segments of one coarse key merge (fewer,
    longer matmuls); sorted, into chunks of ``max_rows`` as before."""
    keys, sizes, starts = [], [], []
    for key, size, start in zip(grouping.keys, grouping.sizes, grouping.starts, strict=True):
        coarse = key // divisor
        if keys and keys[-1] == coarse and starts[-1] + sizes[-1] == start:
            sizes[-1] += size
        else:
            keys.append(coarse), sizes.append(size), starts.append(start)
    if grouping.in_place:
        return Grouping(tuple(keys), tuple(sizes), tuple(starts), None)
    return _chunked(keys, sizes, grouping.rows, max_rows)


@dataclass(frozen=True)
class TorchRouting:
    """Groupings and per-(token, choice) weights of one call."""

    tokens: Grouping  # by modality
    choices: tuple[Grouping, ...]  # choice j: by modality * E + expert[:, j]
    gate: torch.Tensor  # [N, k] float32, 0 without adapter
    scale: torch.Tensor  # [N] float32 scale of the token's modality, 0 without adapter
    weight: torch.Tensor  # [N, k] float32 gate * scale
    adapted: torch.Tensor  # [N] bool
    expert: torch.Tensor  # [N, k] expert ids as given (out of range allowed without adapter)
    n_experts: int

    @property
    def n_tokens(self) -> int:
        return self.adapted.shape[0]


def prepare_torch_routing(modality, expert, gate, scale_vec, n_modalities: int, n_experts: int, *,
                          row_bytes: int) -> TorchRouting:
    """Groupings and weights for validated inputs (``scale_vec``: (M,) float32; ``row_bytes``: the
    widest row of x, the output or their gradients). Few tensor ops: each costs microseconds, which
    matter next to a small layer."""
    mod = modality.long()
    adapted = mod >= 0
    mod0 = mod.clamp_min(0)
    keys = torch.where(adapted[:, None], mod0[:, None] * n_experts + expert, -1)  # [N, k]
    choices = tuple(group_tokens(keys[:, j].contiguous(), n_modalities * n_experts, row_bytes=row_bytes)
                    for j in range(keys.shape[1]))
    tokens = None
    if not choices[0].in_place:  # the modalities may still form few runs (token routing of an a/v prompt)
        tokens = group_tokens(keys[:, 0].div(n_experts, rounding_mode="floor"), n_modalities, may_sort=False)
    if tokens is None:  # choice 0's groups refine the modalities': share its order
        tokens = coarsen(choices[0], n_experts, chunk_rows(row_bytes))
    scale = scale_vec[mod0] * adapted
    gate = torch.where(adapted[:, None], gate.float(), 0.0)  # a padding row's gate never reaches a result
    return TorchRouting(tokens=tokens, choices=choices, gate=gate, scale=scale, weight=gate * scale[:, None],
                        adapted=adapted, expert=expert, n_experts=n_experts)
