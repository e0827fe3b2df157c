"""Tiny random models of the decoder families of the installed transformers (no downloads), with the
inputs their processors would make: a left-padded batch of two prompts, and for vision/audio-language
models the placeholder tokens expanded to their feature count with the matching pixel/audio tensors.

Used by the support matrix (``tests/support_matrix.py``) and the multimodal tests. Every builder is
seeded; hidden 32, 2 layers, 4 query heads over 2 KV heads (GQA); families with a sliding window
get a window of 6 (shorter than the prompts, so it bites), Gemma2 keeps its default logit softcap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

VOCAB = 128
TEXT_LOW, TEXT_HIGH = 3, 100  # ordinary text tokens; placeholders and markers sit above
WINDOW = 6
PROMPT = 12  # prompt length of the text families; the second sample is left-padded by PAD
PAD = 4
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False)
# Placeholder and marker token ids of the multimodal configs.
IMAGE, VIDEO, AUDIO, VISION_START, VISION_END, AUDIO_START, AUDIO_END = 120, 121, 122, 123, 124, 125, 126


@dataclass(frozen=True)
class Family:
    """One row of the support matrix."""

    name: str
    model_class: str  # a transformers class
    build_config: object  # () -> config
    make_inputs: object = None  # (model) -> generate/forward kwargs; None: the text prompt
    features: tuple = ()  # what the tiny model exercises (shown in the matrix)
    multimodal: bool = False
    extra: dict = field(default_factory=dict)

    def build(self, *, seed: int = 0):
        import transformers

        config = self.build_config()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = getattr(transformers, self.model_class)(config)
            # Larger-than-init weights so attention is far from uniform and differences show.
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() == 2 and "embed" not in name:
                        p.normal_(std=0.15)
        return model.eval()

    def inputs(self, model) -> dict:
        return (self.make_inputs or text_prompt)(model)


def text_prompt(model=None, *, seed: int = 0) -> dict:
    """Two prompts of PROMPT tokens, the second left-padded by PAD (pad id 0, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(TEXT_LOW, TEXT_HIGH, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def text_modality_ids(inputs) -> torch.Tensor:
    """Visual and audio spans for the text prompt, text elsewhere, 0 (not -1) at the pads: the padding
    must come from the attention mask."""
    ids = torch.zeros_like(inputs["input_ids"])
    ids[:, 5:9], ids[:, 9:11] = 1, 2
    ids[1, :PAD] = 0
    return ids


def _config(name, **extra):
    def build():
        import transformers

        return getattr(transformers, name)(**SIZES, **extra)

    return build


def _text(name, prefix, *, features=(), config=None, model_class=None, **extra):
    return Family(name, model_class or f"{prefix}ForCausalLM", _config(config or f"{prefix}Config", **extra),
                  features=features)


MOE = dict(num_experts_per_tok=2)

TEXT_FAMILIES = [
    _text("LLaMA", "Llama"),
    _text("Mistral", "Mistral", sliding_window=WINDOW, features=("sliding window",)),
    _text("Mixtral", "Mixtral", sliding_window=WINDOW, num_local_experts=4, **MOE, features=("sliding window", "MoE")),
    _text("Qwen2", "Qwen2"),
    _text("Qwen2 (sliding)", "Qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
          features=("sliding window on layer 1",)),
    _text("Qwen2-MoE", "Qwen2Moe", num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16,
          **MOE, features=("MoE",)),
    _text("Qwen3", "Qwen3", head_dim=8),
    _text("Qwen3-MoE", "Qwen3Moe", head_dim=8, num_experts=4, moe_intermediate_size=16, **MOE, features=("MoE",)),
    _text("Gemma", "Gemma", head_dim=8),
    _text("Gemma2", "Gemma2", head_dim=8, sliding_window=WINDOW,
          features=("softcap 50 (eager default)", "sliding window on layer 0")),
    _text("Gemma3", "Gemma3", config="Gemma3TextConfig", head_dim=8, sliding_window=WINDOW,
          layer_types=["sliding_attention", "full_attention"], features=("sliding window on layer 0",)),
    _text("Phi3", "Phi3", sliding_window=WINDOW, features=("sliding window", "fused qkv_proj")),
    _text("Starcoder2", "Starcoder2", sliding_window=WINDOW, features=("sliding window",)),
    _text("Cohere", "Cohere"),
    _text("Olmo2", "Olmo2"),
    _text("GLM", "Glm", head_dim=8),
]


# -------------------------------------------------------------------------------------------------
# Vision/audio-language families: the placeholder ids are in the config
# -------------------------------------------------------------------------------------------------

MM_TEXT = dict(SIZES, pad_token_id=None, bos_token_id=None, eos_token_id=None)
MROPE = {"rope_type": "default", "mrope_section": [1, 1, 2]}  # head_dim 8: 4 frequency pairs
VISION_PATCH = dict(patch_size=14, spatial_merge_size=1, temporal_patch_size=2)  # one 2x2 grid = 4 tokens
N_VISUAL = 4  # visual tokens per sample
AUDIO_FRAMES, N_AUDIO = 30, 7  # mel frames -> tokens after the encoder's conv (stride 2) and pooling (2)


def _padded(prompts, seed=0):
    """input_ids / attention_mask of prompts (lists of ids), left-padded to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
    return {"input_ids": ids, "attention_mask": mask}


def _words(n, seed):
    return torch.randint(TEXT_LOW, TEXT_HIGH, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _qwen_vision_pixels(n_samples):
    """pixel values as the Qwen2-VL image processor flattens them: (patches, C * T * P * P), grid (t, h, w)."""
    pixels = torch.randn(n_samples * N_VISUAL, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(7))
    return pixels, torch.tensor([[1, 2, 2]] * n_samples)


def omni_inputs(model) -> dict:
    """Qwen2.5-Omni thinker: <vision_start> video x4 <vision_end> <audio_start> audio x7 <audio_end> text."""
    prompts = [_words(n, seed) + [VISION_START] + [VIDEO] * N_VISUAL + [VISION_END, AUDIO_START] + [AUDIO] * N_AUDIO
               + [AUDIO_END] + _words(4, seed + 9) for seed, n in ((1, 4), (2, 1))]
    pixels, grid = _qwen_vision_pixels(2)
    g = torch.Generator().manual_seed(8)
    return {**_padded(prompts), "pixel_values_videos": pixels, "video_grid_thw": grid,
            "video_second_per_grid": torch.ones(2),
            "input_features": torch.randn(2, 20, AUDIO_FRAMES, generator=g),
            "feature_attention_mask": torch.ones(2, AUDIO_FRAMES, dtype=torch.long)}


def qwen_vl_inputs(model) -> dict:
    prompts = [_words(n, seed) + [VISION_START] + [IMAGE] * N_VISUAL + [VISION_END] + _words(4, seed + 9)
               for seed, n in ((1, 4), (2, 1))]
    inputs = _padded(prompts)
    pixels, grid = _qwen_vision_pixels(2)
    return {**inputs, "pixel_values": pixels, "image_grid_thw": grid,
            "mm_token_type_ids": (inputs["input_ids"] == IMAGE).long()}


def image_inputs(model, *, token_type_ids=False) -> dict:
    """LLaVA / Gemma3: one 16x16 image per sample, N_VISUAL image tokens."""
    prompts = [_words(n, seed) + [IMAGE] * N_VISUAL + _words(4, seed + 9) for seed, n in ((1, 4), (2, 1))]
    inputs = _padded(prompts)
    inputs["pixel_values"] = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    if token_type_ids:
        inputs["token_type_ids"] = (inputs["input_ids"] == IMAGE).long()
    return inputs


def qwen_audio_inputs(model) -> dict:
    """Qwen2-Audio: Whisper-style features padded to 3000 frames, AUDIO_FRAMES of them real."""
    prompts = [_words(n, seed) + [AUDIO_START] + [AUDIO] * N_AUDIO + [AUDIO_END] + _words(4, seed + 9)
               for seed, n in ((1, 4), (2, 1))]
    frames = torch.zeros(2, 3000, dtype=torch.long)
    frames[:, :AUDIO_FRAMES] = 1
    return {**_padded(prompts), "input_features": torch.randn(2, 20, 3000, generator=torch.Generator().manual_seed(8)),
            "feature_attention_mask": frames}


def _omni_config():
    from transformers import Qwen2_5OmniThinkerConfig

    return Qwen2_5OmniThinkerConfig(
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           fullatt_block_indexes=[0], **VISION_PATCH),
        audio_config=dict(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=32, encoder_layers=1,
                          num_mel_bins=20, max_source_positions=1500, n_window=100, output_dim=32),
        text_config=dict(MM_TEXT, rope_scaling=MROPE), audio_token_index=AUDIO, image_token_index=IMAGE,
        video_token_index=VIDEO, audio_start_token_id=AUDIO_START, audio_end_token_id=AUDIO_END,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, user_token_id=TEXT_HIGH)


def _qwen_vl_config(name, vision):
    def build():
        import transformers

        return getattr(transformers, name)(
            text_config=dict(MM_TEXT, rope_scaling=MROPE), vision_config=vision, image_token_id=IMAGE,
            video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)

    return build


def _llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(text_config=LlamaConfig(**MM_TEXT),
                       vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=4, image_size=16, patch_size=8),
                       image_token_index=IMAGE, vision_feature_layer=-1, vision_feature_select_strategy="default",
                       image_seq_length=N_VISUAL)


def _gemma3_config():
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    return Gemma3Config(text_config=Gemma3TextConfig(**MM_TEXT, head_dim=8, sliding_window=WINDOW,
                                                     layer_types=["sliding_attention", "full_attention"]),
                        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                         num_attention_heads=4, image_size=16, patch_size=4),
                        mm_tokens_per_image=N_VISUAL, image_token_index=IMAGE, boi_token_index=VISION_START,
                        eoi_token_index=VISION_END)


def _qwen_audio_config():
    from transformers import Qwen2AudioConfig, Qwen2Config

    return Qwen2AudioConfig(text_config=Qwen2Config(**MM_TEXT),
                            audio_config=dict(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=32,
                                              encoder_layers=1, num_mel_bins=20, max_source_positions=1500),
                            audio_token_index=AUDIO)


MULTIMODAL_FAMILIES = [
    Family("Qwen2.5-Omni thinker", "Qwen2_5OmniThinkerForConditionalGeneration", _omni_config, omni_inputs,
           features=("audio + video placeholders", "M-RoPE"), multimodal=True),
    Family("Qwen2-VL", "Qwen2VLForConditionalGeneration",
           _qwen_vl_config("Qwen2VLConfig", dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                                                 **VISION_PATCH)),
           qwen_vl_inputs, features=("image placeholders", "M-RoPE"), multimodal=True),
    Family("Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration",
           _qwen_vl_config("Qwen2_5_VLConfig", dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4,
                                                    out_hidden_size=32, window_size=28, fullatt_block_indexes=[0],
                                                    **VISION_PATCH)),
           qwen_vl_inputs, features=("image placeholders", "M-RoPE"), multimodal=True),
    Family("LLaVA", "LlavaForConditionalGeneration", _llava_config, image_inputs,
           features=("image placeholders",), multimodal=True),
    Family("Gemma3 (vision)", "Gemma3ForConditionalGeneration", _gemma3_config,
           lambda model: image_inputs(model, token_type_ids=True),
           features=("image placeholders", "bidirectional image tokens"), multimodal=True),
    Family("Qwen2-Audio", "Qwen2AudioForConditionalGeneration", _qwen_audio_config, qwen_audio_inputs,
           features=("audio placeholders",), multimodal=True),
]

FAMILIES = {f.name: f for f in TEXT_FAMILIES + MULTIMODAL_FAMILIES}
