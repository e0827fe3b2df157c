"""MoSE cases of the kernel report: every GPU preset shape, forward and backward, through the unfused
``mose_lora`` Triton path (``out`` = the base output) and the fused ``mose_linear_triton`` (what
``MoSELinear`` calls without dropout); variants (top-2, no out, in place, deterministic, update norms,
fp16/fp32) at the headline shape.

The launches come from the autograd Functions' entry points (``mose_lora_triton``,
``mose_linear_triton``) and a ``backward`` through them, so every backward kernel the training step
runs is captured. The fused op's cuBLAS GEMMs (``addmm_`` with beta = 1) are not Triton launches and
do not appear.
"""

from __future__ import annotations

import functools

import torch

from bench.presets import PRESETS

from .cases import DTYPE_SHORT, Case, Dot, dtype_name

OP = "mose"
# Headline shape (issue 12): LLaMA-2-7B q/v projection, N = 8192 tokens, d = 4096, r = 16, M = 3, E = 4.
MAIN = ("lora-4096x4096-n8192-r16-top1-bf16", "linear-4096x4096-n8192-r16-top1-bf16")
VARIANTS = {
    "top2": dict(top_k=2),
    "noout": dict(with_out=False),
    "inplace": dict(inplace=True),
    "deterministic": dict(deterministic=True),
    "norm": dict(update_norm=True),
    "top2+deterministic": dict(top_k=2, deterministic=True),  # the only path that sorts pairs too
}
LINEAR_ONLY, LORA_ONLY = {"update_norm"}, {"with_out", "inplace"}
DTYPE_VARIANTS = (torch.float16, torch.float32)


def _inputs(n_tokens, d_in, d_out, rank, n_modalities, n_experts, top_k, dtype, seed=0):
    """Routing with real values (the launchers sort it); big tensors allocated and never touched."""
    g = torch.Generator().manual_seed(seed)
    modality = torch.randint(0, n_modalities, (n_tokens,), generator=g)
    expert = torch.rand(n_tokens, n_experts, generator=g).argsort(dim=1)[:, :top_k]  # distinct choices
    gate = torch.rand(n_tokens, top_k, generator=g)
    x = torch.empty(n_tokens, d_in, dtype=dtype, requires_grad=True)
    A = torch.empty(n_modalities, rank, d_in, dtype=dtype, requires_grad=True)
    B = torch.empty(n_modalities, n_experts, d_out, rank, dtype=dtype, requires_grad=True)
    scale_vec = torch.full((n_modalities,), 2.0, dtype=torch.float32)
    return x, modality, expert, gate.requires_grad_(True), A, B, scale_vec


def _run_lora(n_tokens, d_in, d_out, rank, n_modalities, n_experts, dtype, *, top_k=1, with_out=True, inplace=False,
              deterministic=False):
    from mosear_fast.kernels.mose.function import mose_lora_triton

    x, modality, expert, gate, A, B, scale_vec = _inputs(n_tokens, d_in, d_out, rank, n_modalities, n_experts,
                                                         top_k, dtype)
    out = torch.empty(n_tokens, d_out, dtype=dtype) if with_out else None
    y = mose_lora_triton(x, modality, expert, gate, A, B, scale_vec, out, inplace=inplace,
                         deterministic=deterministic)
    y.backward(torch.empty_like(y))


def _run_linear(n_tokens, d_in, d_out, rank, n_modalities, n_experts, dtype, *, top_k=1, deterministic=False,
                update_norm=False):
    from unittest import mock

    from mosear_fast.kernels.mose import function
    from mosear_fast.kernels.mose.function import mose_linear_triton

    x, modality, expert, gate, A, B, scale_vec = _inputs(n_tokens, d_in, d_out, rank, n_modalities, n_experts,
                                                         top_k, dtype)
    W = torch.empty(d_out, d_in, dtype=dtype)
    # the base GEMMs are cuBLAS calls, not Triton launches: left out (on CPU tensors they would run)
    with mock.patch.object(function, "_gemm_accumulate", lambda out, a, b: out):
        y = mose_linear_triton(x, W, None, modality, expert, gate, A, B, scale_vec,
                               return_update_norm=update_norm, deterministic=deterministic)
        if update_norm:
            y = y[0]
        y.backward(torch.empty_like(y))


def _roofline(kind: str, n, d_in, d_out, r, k, size) -> dict:
    """Forward + backward of the adapter alone (lora) or of base + adapter (linear), minimum traffic."""
    adapter = 2 * n * r * d_in + 2 * n * k * r * d_out  # shrink + expand
    if kind == "lora":  # fwd: x, out -> y; bwd: dy -> dx (+ x for dA)
        return dict(bytes=size * (n * d_in + 2 * n * d_out + n * d_out + 2 * n * d_in), flops=3 * adapter)
    base = 2 * n * d_in * d_out
    return dict(bytes=size * (2 * n * d_in + 2 * n * d_out + d_in * d_out), flops=2 * base + 3 * adapter)


def _case(kind: str, shape: dict, dtype: torch.dtype, flags: dict, variant: str = "") -> Case:
    top_k = flags.get("top_k", shape["top_k"])
    suffix = variant.removeprefix("top2").lstrip("+")  # top-2 is in the name already
    name = (f"{kind}-{shape['d_in']}x{shape['d_out']}-n{shape['n_tokens']}-r{shape['rank']}-top{top_k}-"
            f"{DTYPE_SHORT[dtype]}" + (f"+{suffix}" if suffix else ""))
    dims = dict(n_tokens=shape["n_tokens"], d_in=shape["d_in"], d_out=shape["d_out"], rank=shape["rank"],
                n_modalities=shape["n_modalities"], n_experts=shape["n_experts"])
    defaults = dict(top_k=shape["top_k"], deterministic=False)
    if kind == "lora":
        defaults.update(with_out=True, inplace=False)
    else:
        defaults.update(update_norm=False)
    full = {**defaults, **flags}
    run = functools.partial(_run_lora if kind == "lora" else _run_linear, **dims, dtype=dtype, **full)
    params = dict(entry="mose_lora" if kind == "lora" else "mose_linear", **dims, dtype=dtype_name(dtype), **full,
                  passes="fwd+bwd", variant=variant)
    size = torch.empty((), dtype=dtype).element_size()
    roof = _roofline(kind, shape["n_tokens"], shape["d_in"], shape["d_out"], shape["rank"], full["top_k"], size)
    return Case(OP, name, params, run, main=name in MAIN, roofline=roof)


def cases() -> list[Case]:
    """Every GPU preset shape for both entry points (bf16, top-1), then the variants at the headline shape."""
    found: dict[str, Case] = {}
    shapes = {}
    for preset, make in PRESETS[OP].items():
        if preset.startswith("cpu"):
            continue
        for shape in make():
            for kind in ("lora", "linear"):
                case = _case(kind, shape, shape["dtype"], {})
                shapes[case.name] = shape
                found.setdefault(case.name, case)
    for name in MAIN:
        kind, shape = name.split("-", 1)[0], shapes[name]
        for variant, flags in VARIANTS.items():
            if set(flags) & (LORA_ONLY if kind == "linear" else LINEAR_ONLY):
                continue  # mose_linear has no out; mose_lora no update norms
            case = _case(kind, shape, torch.bfloat16, flags, variant)
            found.setdefault(case.name, case)
        for dtype in DTYPE_VARIANTS:
            case = _case(kind, shape, dtype, {})
            found.setdefault(case.name, case)
    return list(found.values())


def dots(kernel: str, c: dict) -> list[Dot] | None:
    """The dots of one pass of each MoSE kernel (per loop body over d, per combo of groups in a block)."""
    top_k = c.get("TOP_K", 1)
    bt, br = c.get("BLOCK_T"), c.get("BLOCK_R")
    table = {
        "mose_route_kernel": lambda: [],  # a counting sort: no dots
        "mose_shrink_kernel": lambda: [Dot(bt, br, c["BLOCK_K"])],  # h += x A^T
        "mose_expand_kernel": lambda: [Dot(bt, c["BLOCK_N"], br, count=top_k)],  # u += (g h) B^T, per choice
        # g_j += dy B_j per choice; with FUSE_DB also dB_j += dy^T (g h) per choice
        "mose_dy_kernel": lambda: [Dot(bt, br, c["BLOCK_N"], count=top_k)]
        + ([Dot(c["BLOCK_N"], br, bt, count=top_k)] if c.get("FUSE_DB") else []),
        # dx = dh A (WRITE_DX); dA += dh^T x (FUSE_DA)
        "mose_x_kernel": lambda: ([Dot(bt, c["BLOCK_K"], br)] if c.get("WRITE_DX") else [])
        + ([Dot(br, c["BLOCK_K"], bt)] if c.get("FUSE_DA") else []),
        "mose_wgrad_A_kernel": lambda: [Dot(br, c["BLOCK_K"], bt)],  # dA += dh^T x
        "mose_wgrad_B_kernel": lambda: [Dot(c["BLOCK_N"], br, bt)],  # dB += dy^T (g h)
    }
    return table[kernel]() if kernel in table else None
