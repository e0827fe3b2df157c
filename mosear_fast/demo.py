"""``mosear-demo``: the two ops on a built-in audio-visual example.

A prompt laid out like the paper's backbone (text, many visual tokens, a few audio tokens, text)
whose attention over-weights audio: AR's per-modality attention shares are printed before and
after reallocation, then the MoSE update norm per modality.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .ops import ar_attention, mose_lora

MODALITY_NAMES = ("text", "visual", "audio")


def build_prompt_layout(n_text: int, n_visual: int, n_audio: int) -> torch.Tensor:
    """Modality ids of one prompt: half the text, the visual span, the audio span, the rest of the text."""
    head = n_text // 2
    return torch.tensor([0] * head + [1] * n_visual + [2] * n_audio + [0] * (n_text - head))


def audio_biased_attention_inputs(layout, *, heads, head_dim, audio_pull, generator):
    """q, k, v where audio keys align with the queries (an audio-biased backbone)."""
    length = layout.numel()
    q = torch.randn(1, heads, length, head_dim, generator=generator)
    k = torch.randn(1, heads, length, head_dim, generator=generator)
    v = torch.randn(1, heads, length, head_dim, generator=generator)
    direction = torch.randn(heads, 1, head_dim, generator=generator)
    q = q + direction
    k[:, :, layout == 2] += audio_pull * direction
    return q, k, v


def attention_shares(q, k, key_modality, *, strength, backend):
    """Mean attention share per modality before and after AR, over the text queries after the spans.

    After-AR shares come from the op itself: with v = one-hot(modality), the output of each query
    is exactly its reallocated mass per modality.
    """
    n_mod = len(MODALITY_NAMES)
    onehot = torch.nn.functional.one_hot(key_modality.clamp(min=0), q.shape[-1]).to(q.dtype)  # v has k's head dim
    v = onehot[:, None].expand(-1, q.shape[1], -1, -1)
    after, before = ar_attention(q, k, v, key_modality, num_modalities=n_mod, strength=strength,
                                 return_masses=True, backend=backend)
    last_audio = int((key_modality[0] == 2).nonzero().max())
    queries = slice(last_audio + 1, None)  # text queries that see every modality
    return before[:, :, queries].mean((0, 1, 2)), after[:, :, queries, :n_mod].mean((0, 1, 2))


def mose_update_norms(layout, *, d_model, rank, n_experts, backend, generator):
    """Mean L2 norm of the MoSE update per modality for random adapters and random routing."""
    n_mod = len(MODALITY_NAMES)
    x = torch.randn(layout.numel(), d_model, generator=generator)
    A = torch.randn(n_mod, rank, d_model, generator=generator) * d_model**-0.5
    B = torch.randn(n_mod, n_experts, d_model, rank, generator=generator) * rank**-0.5
    expert = torch.randint(0, n_experts, (layout.numel(), 1), generator=generator)
    gate = torch.rand(layout.numel(), 1, generator=generator)
    update = mose_lora(x, layout, expert, gate, A, B, 16.0 / rank, backend=backend)
    return torch.stack([update[layout == m].norm(dim=1).mean() for m in range(n_mod)])


def parse_args(argv):
    p = argparse.ArgumentParser(prog="mosear-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--text", type=int, default=32, help="text tokens in the prompt (default 32)")
    p.add_argument("--visual", type=int, default=259, help="visual tokens: 256 patches + face, video, CLS (259)")
    p.add_argument("--audio", type=int, default=1, help="audio tokens (default 1, as in Emotion-LLaMA)")
    p.add_argument("--strength", type=float, default=0.5, help="AR strength in [0, 1] (default 0.5)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"), help="op backend")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    layout = build_prompt_layout(args.text, args.visual, args.audio)
    try:
        q, k, _ = audio_biased_attention_inputs(layout, heads=8, head_dim=64, audio_pull=1.2, generator=g)
        before, after = attention_shares(q, k, layout[None], strength=args.strength, backend=args.backend)
        norms = mose_update_norms(layout, d_model=256, rank=16, n_experts=4, backend=args.backend, generator=g)
    except (ValueError, TypeError, NotImplementedError) as err:
        print(f"mosear-demo: error: {err}", file=sys.stderr)
        return 2
    print(f"Prompt: {args.text} text, {args.visual} visual, {args.audio} audio tokens; AR strength {args.strength}")
    print(f"{'modality':<10}{'share before AR':>18}{'share after AR':>17}{'MoSE update norm':>19}")
    for m, name in enumerate(MODALITY_NAMES):
        print(f"{name:<10}{before[m]:>18.3f}{after[m]:>17.3f}{norms[m]:>19.3f}")
    print("AR moves mass between the balance modalities (visual, audio) toward equal shares; text keeps its own.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
