"""Tiny Hugging Face causal LMs with random weights, built from configs (no hub access).

Shared by the module, training and export tests. Every builder is seeded, so two calls with the
same arguments return identical weights (PEFT save/load round trips rebuild the base this way).
"""

from __future__ import annotations

import torch

VOCAB = 96
HIDDEN = 32
PAD_ID = 0


def tiny_llama(*, seed: int = 0, layers: int = 2, hidden: int = HIDDEN, heads: int = 4, kv_heads: int = 4,
               attn_implementation: str = "sdpa", **overrides):
    """A 2-layer LlamaForCausalLM (MHA by default), fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_sizes(hidden, layers, heads, kv_heads), **overrides)
    return _build(LlamaForCausalLM, config, seed, attn_implementation)


def tiny_qwen2(*, seed: int = 0, layers: int = 2, hidden: int = HIDDEN, heads: int = 4, kv_heads: int = 2,
               attn_implementation: str = "sdpa", **overrides):
    """A 2-layer Qwen2ForCausalLM with GQA (4 query heads, 2 KV heads), fp32, eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_sizes(hidden, layers, heads, kv_heads), **overrides)
    return _build(Qwen2ForCausalLM, config, seed, attn_implementation)


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def save_qwen2_with_adapter(root):
    """A tiny Qwen2 folder and a MoSE adapter folder for it (q/v/o projections, with an ar_config.json),
    as a user exporting ``QWEN --adapter ADAPTER`` has them; returns ``(base_dir, adapter_dir)``."""
    import json

    from peft import get_peft_model

    from mosear_fast import MoSEConfig

    base_dir, adapter_dir = root / "qwen2", root / "adapter"
    tiny_qwen2(seed=3).save_pretrained(base_dir)
    torch.manual_seed(4)
    peft_model = get_peft_model(tiny_qwen2(seed=3), MoSEConfig(r=4, num_experts=3, top_k=1, init_weights=False,
                                                               target_modules=["q_proj", "v_proj", "o_proj"]))
    peft_model.save_pretrained(adapter_dir)
    (adapter_dir / "ar_config.json").write_text(json.dumps({"strength": 0.7, "balance": ["visual", "audio"]}))
    return base_dir, adapter_dir


def _sizes(hidden, layers, heads, kv_heads):
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _build(model_cls, config, seed, attn_implementation):
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
        # Larger-than-init weights so attention is far from uniform and AR has something to move.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    p.normal_(std=0.15)
    return model.eval()


def av_prompt(batch: int, length: int, *, seed: int = 0, left_pad=None, n_visual: int = 6, n_audio: int = 2):
    """Token ids, attention mask and modality ids of audio-visual prompts: text, visual, audio, text.

    ``left_pad``: per-sample number of padding tokens on the left (mask 0, ids PAD_ID, modality -1).
    """
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    modality = torch.zeros(batch, length, dtype=torch.long)
    pads = left_pad or [0] * batch
    for b, pad in enumerate(pads):
        start = pad + 2
        modality[b, start:start + n_visual] = 1
        modality[b, start + n_visual:start + n_visual + n_audio] = 2
        input_ids[b, :pad] = PAD_ID
        mask[b, :pad] = 0
        modality[b, :pad] = -1
    return input_ids, mask, modality


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what generate computes), for forward calls on padded batches."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)
