"""Real audio-visual and vision/audio-language models of transformers, end to end (tiny random configs,
inputs shaped as their processors make them): the modality ids come from the placeholder token ids in
the config without the user passing any, MoSE trains a step, AR moves the attention shares, generate
works (and at strength 0 reproduces the model's own tokens, see also the support matrix)."""

import copy

import pytest
import torch

from mosear_fast import ARConfig, MoSEConfig, apply_mosear, attention_shares, aux_loss
from tests.families import AUDIO, FAMILIES, IMAGE, VIDEO

# family -> the placeholder ids apply_mosear must read from its config ({modality id: tokens})
PLACEHOLDERS = {
    "Qwen2.5-Omni thinker": {1: (IMAGE, VIDEO), 2: (AUDIO,)},
    "Qwen2-VL": {1: (IMAGE, VIDEO)},
    "Qwen2.5-VL": {1: (IMAGE, VIDEO)},
    "LLaVA": {1: (IMAGE,)},
    "Gemma3 (vision)": {1: (IMAGE,)},
    "Qwen2-Audio": {2: (AUDIO,)},
}
AR_FAMILIES = [name for name in PLACEHOLDERS if name != "Gemma3 (vision)"]  # Gemma3: bidirectional image blocks
MOSE = dict(r=4, num_experts=2, top_k=1, target_modules=["q_proj", "v_proj", "o_proj"])


def expected_ids(inputs):
    ids = inputs["input_ids"]
    expected = torch.zeros_like(ids)
    expected[(ids == IMAGE) | (ids == VIDEO)] = 1
    expected[ids == AUDIO] = 2
    return expected.masked_fill(inputs["attention_mask"] == 0, -1)


@pytest.mark.parametrize("name", sorted(PLACEHOLDERS))
def test_modality_ids_come_from_the_config_placeholders(name):
    family = FAMILIES[name]
    model = family.build()
    ar = ARConfig(strength=0.5) if name in AR_FAMILIES else None
    apply_mosear(model, mose=MoSEConfig(**MOSE), ar=ar)
    context = model._mosear_context
    assert context.placeholder_tokens == PLACEHOLDERS[name]
    inputs = family.inputs(model)
    with torch.no_grad():
        model(**inputs)
    assert torch.equal(context.key_modality, expected_ids(inputs))
    present = set(expected_ids(inputs).unique().tolist())
    assert present >= {0, *PLACEHOLDERS[name]}  # the prompt has text and the family's placeholders
    # MoSE is on the language model only (vision/audio encoders keep their plain linears)
    decoder = model.get_decoder()
    adapted = [n for n, m in model.named_modules() if hasattr(m, "mose_adapter")]
    language = {id(m) for m in decoder.modules()}
    modules = dict(model.named_modules())
    assert adapted and all(id(modules[n]) in language for n in adapted)


@pytest.mark.parametrize("name", sorted(PLACEHOLDERS))
def test_mose_trains_a_step_on_every_modality(name):
    family = FAMILIES[name]
    model = apply_mosear(family.build(), mose=MoSEConfig(**MOSE, init_weights=False)).train()
    inputs = family.inputs(model)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    out = model(**inputs, labels=labels)
    (out.loss + aux_loss(model)).backward()
    q_proj = model.get_decoder().layers[0].self_attn.q_proj
    adapter = q_proj.mose_adapter["default"]
    for modality in (0, *PLACEHOLDERS[name]):  # every modality in the prompt sends gradients to its own A
        assert adapter.A.grad[modality].abs().sum() > 0, f"no gradient for modality {modality}"
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(**inputs, labels=labels).loss
    assert torch.isfinite(out.loss) and after < out.loss  # one step on the same batch lowers its loss


@pytest.mark.parametrize("name", AR_FAMILIES)
def test_ar_moves_the_attention_shares_and_generate_works(name):
    family = FAMILIES[name]
    reference = family.build()
    inputs = family.inputs(reference)
    # visual and audio balanced against text too, so a model with one kind of placeholder is reallocated
    model = apply_mosear(copy.deepcopy(reference), mose=MoSEConfig(**MOSE),
                         ar=ARConfig(strength=1.0, balance=("text", "visual", "audio")))
    tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert tokens.shape == (2, inputs["input_ids"].shape[1] + 3)
    # The last step's shares: one generated (text) query per sample, which sees every modality of the prompt.
    before, after = attention_shares(model), attention_shares(model, reallocated=True)
    assert sorted(before) == [0, 1]
    present = [0, *PLACEHOLDERS[name]]
    for layer in before:
        assert all(before[layer][m] > 0 for m in present)
        assert before[layer][present].max() - before[layer][present].min() > 1e-3
        shares = after[layer][present]  # strength 1, uniform target: equal shares
        assert (shares - shares.mean()).abs().max() < 1e-5
        assert after[layer].sum().item() == pytest.approx(1.0, abs=1e-5)
    plain = reference.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    apply_mosear(model, ar=ARConfig(strength=0.0))  # strength 0, fresh adapters: the model's own tokens
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0), plain)


def test_omni_thinker_audio_and_video_end_to_end():
    """Qwen2.5-Omni's thinker with audio features and video frames: the user passes no modality ids; the
    audio and video placeholders become modalities 2 and 1, a generated query's audio and visual shares
    are balanced, and a training forward with AR on sends finite gradients to the adapters."""
    family = FAMILIES["Qwen2.5-Omni thinker"]
    model = apply_mosear(family.build(), mose=MoSEConfig(**MOSE, init_weights=False), ar=ARConfig(strength=1.0))
    inputs = family.inputs(model)
    model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    shares, after = attention_shares(model), attention_shares(model, reallocated=True)  # the generated query's
    for layer in shares:
        assert shares[layer][1] > 0 and shares[layer][2] > 0
        assert (shares[layer][1] - shares[layer][2]).abs() > 1e-3
        assert (after[layer][1] - after[layer][2]).abs() < 1e-5
    out = model.train()(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100))
    (out.loss + aux_loss(model)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_peft_adapts_the_language_model_only():
    """get_peft_model with q_proj/v_proj (names the Omni thinker's audio encoder shares) adapts the language
    model's linears only, and the PEFT model takes the thinker's audio and video inputs."""
    from peft import get_peft_model

    family = FAMILIES["Qwen2.5-Omni thinker"]
    base = family.build()
    peft_model = get_peft_model(base, MoSEConfig(**MOSE))
    language = {id(m) for m in base.get_decoder().modules()}
    adapted = [m for m in base.modules() if hasattr(m, "mose_adapter")]
    assert len(adapted) == 2 * 3  # 2 layers x (q, v, o)
    assert all(id(m) in language for m in adapted)
    assert type(base.model.audio_tower.layers[0].self_attn.q_proj) is torch.nn.Linear
    inputs = family.inputs(base)
    with torch.no_grad():
        out = peft_model(**inputs)
    assert torch.isfinite(out.logits).all()
    assert torch.equal(base._mosear_context.key_modality, expected_ids(inputs))
