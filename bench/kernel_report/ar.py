"""AR attention cases of the kernel report: every GPU preset shape, and the flag variants that change
the kernels (masses, query mask, non-causal, key bias, fp16/fp32) at the headline shapes.

The launches come from ``ar_attention_triton`` (the Triton backend's entry point), so block sizes,
split-k and the merge kernel are the launcher's own choices for a 132-SM H100.
"""

from __future__ import annotations

import functools

import torch

from bench.presets import PRESETS, flops

from .cases import DTYPE_SHORT, Case, Dot, dtype_name

OP = "ar"
BALANCE = (1, 2)  # the default balance set: 2 balance classes + the rest class
# Headline shapes (issue 11): LLaMA-2-7B prefill at L = 4096, and decode at L = 4096 (MHA and GQA).
MAIN = ("prefill-llama2-7b-b1-l4096-bf16", "decode-llama2-7b-b1-l4096-bf16", "decode-qwen2.5-omni-7b-b1-l4096-bf16")
# Flag variants, each alone, at the headline shapes; "keybias": rest modalities of different biases
# (4 modalities), which the launcher keeps as separate key classes (4 class passes instead of 3);
# "options": the DESIGN 2.2b options together (a window of Lk / 4, softcap 50, balancing by
# contribution, one target per query head).
VARIANTS = {
    "masses": dict(return_masses=True),
    "qmask": dict(query_mask=True),
    "noncausal": dict(causal=False),
    "keybias": dict(key_bias=True),
    "options": dict(options=True),
    "all": dict(return_masses=True, query_mask=True, key_bias=True),
}
DTYPE_VARIANTS = (torch.float16, torch.float32)


def _run(batch, n_q_heads, n_kv_heads, len_q, len_k, head_dim, dtype, *, causal=True, return_masses=False,
         query_mask=False, key_bias=False, options=False):
    from mosear_fast.kernels.ar_attention.function import ar_attention_triton

    q = torch.empty(batch, n_q_heads, len_q, head_dim, dtype=dtype)
    k = torch.empty(batch, n_kv_heads, len_k, head_dim, dtype=dtype)
    v = torch.empty_like(k)
    n_mod = 4 if key_bias else 3
    key_modality = torch.zeros(batch, len_k, dtype=torch.long)  # int64, as mosear_fast.modality builds it
    extra = {}
    if options:
        extra = dict(window=len_k // 4, softcap=50.0, balance_by="contribution",
                     target=tuple((1.0 + h % 3, 1.0) for h in range(n_q_heads)))
    ar_attention_triton(q, k, v, key_modality, num_modalities=n_mod, balance=BALANCE,
                        target=extra.pop("target", None), strength=0.5, threshold=0.0,
                        modality_bias=(0.5, 0.0, 0.0, -0.5) if key_bias else None, causal=causal,
                        scale=head_dim ** -0.5,
                        query_mask=torch.ones(batch, len_q, dtype=torch.bool) if query_mask else None,
                        return_masses=return_masses, **extra)


def _roofline(shape: dict, dtype: torch.dtype, causal: bool, return_masses: bool, options: bool) -> dict:
    b, hq, hkv, lq, lk, d = (shape[x] for x in ("batch", "n_q_heads", "n_kv_heads", "len_q", "len_k", "head_dim"))
    size = torch.empty((), dtype=dtype).element_size()
    keys_read = min(lk, lk // 4 + lq - 1) if options else lk  # a window of Lk / 4: the keys some query sees
    moved = size * (2 * b * hq * lq * d + 2 * b * hkv * keys_read * d) + (4 * b * hq * lq * 3 if return_masses else 0)
    if options:  # keys in the window of each query (causal)
        work = 4 * b * hq * d * sum(min(lk - lq + i + 1, lk // 4) for i in range(lq))
    else:
        work = flops("ar", dict(shape, mode="fwd")) if causal else 4 * b * hq * lq * lk * d
    return dict(bytes=moved, flops=work)


def _case(shape: dict, dtype: torch.dtype, flags: dict, variant: str = "") -> Case:
    mode = "decode" if shape["len_q"] == 1 else "prefill"
    name = f"{mode}-{shape['model']}-b{shape['batch']}-l{shape['len_k']}-{DTYPE_SHORT[dtype]}"
    name += f"+{variant}" if variant else ""
    dims = {k: shape[k] for k in ("batch", "n_q_heads", "n_kv_heads", "len_q", "len_k", "head_dim")}
    full = {**dict(causal=True, return_masses=False, query_mask=False, key_bias=False, options=False), **flags}
    params = dict(model=shape["model"], mode=mode, **dims, dtype=dtype_name(dtype), **full,
                  num_modalities=4 if full["key_bias"] else 3, balance=list(BALANCE), variant=variant)
    return Case(OP, name, params, functools.partial(_run, **dims, dtype=dtype, **flags), main=name in MAIN,
                roofline=_roofline(shape, dtype, full["causal"], full["return_masses"], full["options"]))


def cases() -> list[Case]:
    """Every GPU preset shape (bf16, default flags), then the variants at the headline shapes."""
    shapes: dict[str, dict] = {}
    for preset, make in PRESETS[OP].items():
        if not preset.startswith("cpu"):
            for shape in make():
                shapes.setdefault(_case(shape, shape["dtype"], {}).name, shape)
    found = [_case(shape, shape["dtype"], {}) for shape in shapes.values()]
    for name in MAIN:
        shape = shapes[name]
        for variant, flags in VARIANTS.items():
            if shape["len_q"] == 1 and "causal" in flags:
                continue  # one query at the end of the keys: causal or not is the same call
            found.append(_case(shape, torch.bfloat16, flags, variant))
        found += [_case(shape, dtype, {}) for dtype in DTYPE_VARIANTS]
    return found


def dots(kernel: str, constexprs: dict) -> list[Dot] | None:
    """One key block: S = Q K^T and P V, once each. Prefill runs one class at a time (one live
    state); decode holds every class as rows of the same block, so one block is still one S, one PV."""
    if kernel not in ("ar_prefill_kernel", "ar_decode_kernel"):
        return None  # the classification pre-pass and the split-k merge have no dot
    bm, bn, bd = constexprs["BLOCK_M"], constexprs["BLOCK_N"], constexprs["BLOCK_D"]
    return [Dot(bm, bn, bd), Dot(bm, bd, bn)]
