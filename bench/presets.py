"""Model-shaped size presets. Each preset expands to a list of cases (dicts) for one op."""

from __future__ import annotations

import itertools

import torch

# LLaMA-2-7B: hidden 4096, 32 heads (MHA); Qwen2.5-Omni-7B thinker: hidden 3584, 28 query / 4 KV heads.
MODELS = {
    "llama2-7b": dict(hidden=4096, n_q_heads=32, n_kv_heads=32, head_dim=128, mlp=11008),
    "qwen2.5-omni-7b": dict(hidden=3584, n_q_heads=28, n_kv_heads=4, head_dim=128, mlp=18944),
}
MOSE_DEFAULTS = dict(n_modalities=3, n_experts=4, top_k=1)


def _mose(d_in, d_out, tokens, ranks, dtype):
    return [dict(n_tokens=n, d_in=d_in, d_out=d_out, rank=r, dtype=dtype, **MOSE_DEFAULTS)
            for n, r in itertools.product(tokens, ranks)]


def _ar(model, batches, lengths, decode, dtype):
    m = MODELS[model]
    cases = []
    for b, length in itertools.product(batches, lengths):
        for len_q in ([1] if decode else [length]):
            cases.append(dict(batch=b, n_q_heads=m["n_q_heads"], n_kv_heads=m["n_kv_heads"], len_q=len_q,
                              len_k=length, head_dim=m["head_dim"], dtype=dtype, model=model))
    return cases


PRESETS = {
    "mose": {
        # LLaMA-2-7B q/v projections and the Qwen2.5-7B MLP up-projection, as in issue 3.
        "llama2-7b-qv": lambda: _mose(4096, 4096, [2048, 8192, 16384], [16, 64], torch.bfloat16),
        "qwen2.5-7b-mlp": lambda: _mose(3584, 18944, [2048, 8192, 16384], [16, 64], torch.bfloat16),
        # Small enough for the 2-core CPU machine.
        "cpu-small": lambda: _mose(1024, 1024, [512, 2048], [16], torch.float32),
    },
    "ar": {
        "llama2-7b-prefill": lambda: _ar("llama2-7b", [1, 4], [1024, 4096, 16384], False, torch.bfloat16),
        "llama2-7b-decode": lambda: _ar("llama2-7b", [1, 4], [1024, 4096, 16384], True, torch.bfloat16),
        "qwen2.5-omni-7b-prefill": lambda: _ar("qwen2.5-omni-7b", [1, 4], [1024, 4096, 16384], False, torch.bfloat16),
        "qwen2.5-omni-7b-decode": lambda: _ar("qwen2.5-omni-7b", [1, 4], [1024, 4096, 16384], True, torch.bfloat16),
        # 8 heads of 64, as the CPU measurements of REFERENCES.md.
        "cpu-small": lambda: [dict(batch=1, n_q_heads=8, n_kv_heads=8, len_q=length, len_k=length, head_dim=64,
                                   dtype=torch.float32, model="cpu-small") for length in (512, 2048)],
    },
}


def cases(op: str, preset: str, *, mode: str, device: torch.device) -> list[dict]:
    if op not in PRESETS:
        raise ValueError(f"op: expected one of {tuple(PRESETS)}, got {op!r}")
    if preset not in PRESETS[op]:
        raise ValueError(f"preset: expected one of {tuple(PRESETS[op])} for {op}, got {preset!r}")
    return [dict(case, mode=mode, device=device) for case in PRESETS[op][preset]()]


def flops(op: str, case: dict) -> float:
    """Useful floating-point work of one forward (the floor's math plus the adapter or AR)."""
    if op == "mose":
        n, d_in, d_out, r, k = (case[x] for x in ("n_tokens", "d_in", "d_out", "rank", "top_k"))
        fwd = 2 * n * d_in * d_out + 2 * n * r * d_in + 2 * n * k * r * d_out
        return fwd * (2 if case["mode"] == "fwd_bwd" else 1)
    b, h, lq, lk, d = (case[x] for x in ("batch", "n_q_heads", "len_q", "len_k", "head_dim"))
    visible = lq * lk - (lq * (lq - 1)) / 2 if lq == lk else lq * lk  # causal prefill sees half
    return 4 * b * h * visible * d
