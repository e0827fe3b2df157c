"""Bad inputs to the drop-in modules raise ValueError / TypeError naming what to change."""

import pytest
import torch
from torch import nn

from mosear_fast import ARConfig, MoSEConfig, apply_mosear
from tests.models import av_prompt, tiny_llama


@pytest.fixture(scope="module")
def model():
    return apply_mosear(tiny_llama(), mose=MoSEConfig(r=4, num_experts=2), ar=ARConfig(strength=0.5))


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(3, 10, dtype=torch.long), r"modality_ids: expected shape \(B=2, T\)"),
    (torch.zeros(2, 9, dtype=torch.long), r"modality_ids: expected shape \(B=2, 10\)"),
    (torch.zeros(2, 10, 1, dtype=torch.long), r"modality_ids: expected shape \(B=2, T\)"),
    (torch.zeros(2, 10), "modality_ids: expected an integer tensor"),
    (torch.full((2, 10), 3), r"modality_ids: expected ids in \[-1, 3\)"),
    (torch.full((2, 10), -2), r"modality_ids: expected ids in \[-1, 3\)"),
    ([[0] * 10] * 2, "modality_ids: expected a \\(B, T\\) integer torch.Tensor"),
])
def test_bad_modality_ids(model, bad, message):
    ids, mask, _ = av_prompt(2, 10)
    with pytest.raises((ValueError, TypeError), match=message):
        model(input_ids=ids, attention_mask=mask, modality_ids=bad)


def test_bad_modality_ids_in_generate(model):
    ids, mask, modality = av_prompt(2, 10)
    with pytest.raises(ValueError, match=r"modality_ids: expected shape \(B=2, 10\) like the prompt"):
        model.generate(input_ids=ids, attention_mask=mask, modality_ids=modality[:, :8], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"modality_ids: expected ids in \[-1, 3\)"):
        model.generate(input_ids=ids, attention_mask=mask, modality_ids=modality + 5, max_new_tokens=2)


def test_cached_tokens_without_known_ids(model):
    ids, _, modality = av_prompt(1, 10)
    with torch.no_grad():
        out = model(input_ids=ids, modality_ids=modality, use_cache=True)
        with pytest.raises(ValueError, match=r"modality_ids: expected shape \(B=1, 12\) covering the whole"):
            model(input_ids=ids[:, :2], modality_ids=modality[:, :3], cache=out.cache)
        # ids of the new tokens only: the cached ids come from the previous forward
        out = model(input_ids=ids[:, :1], modality_ids=modality[:, :1], cache=out.cache)
        model(input_ids=ids[:, :7], modality_ids=modality[:, :7])  # an unrelated forward in between
        with pytest.raises(ValueError, match="modality_ids: the cache holds 11 tokens"):
            model(input_ids=ids[:, :1], modality_ids=modality[:, :1], cache=out.cache)


def test_model_without_the_target_modules():
    with pytest.raises(ValueError, match=r"MoSEConfig.target_modules: no nn.Linear .* matches \['query'\]"):
        apply_mosear(tiny_llama(), mose=MoSEConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="MoSEConfig.target_modules"):
        apply_mosear(nn.Sequential(nn.ReLU()), mose=MoSEConfig())


def test_unsupported_attention_implementation():
    model = tiny_llama()
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="_attn_implementation: AR replaces 'sdpa' or "
                                         "'eager'.*'flex_attention'"):
        apply_mosear(model, ar=ARConfig())
    with pytest.raises(ValueError, match="does not dispatch attention through transformers' "
                                         "AttentionInterface"):
        apply_mosear(nn.Sequential(nn.Linear(4, 4)), ar=ARConfig())


def test_ar_layers_must_be_attention_layers():
    with pytest.raises(ValueError, match=r"ARConfig.layers: \[5\] are not attention layers"):
        apply_mosear(tiny_llama(), ar=ARConfig(layers=[0, 5]))


@pytest.mark.parametrize("make, message", [
    (lambda: ARConfig(strength=1.5), "ARConfig.strength"),
    (lambda: ARConfig(threshold=-1), "ARConfig.threshold"),
    (lambda: ARConfig(layers="0"), "ARConfig.layers"),
    (lambda: ARConfig(backend="cuda"), "ARConfig.backend"),
    (lambda: MoSEConfig(top_k=3), "MoSEConfig.top_k"),
    (lambda: MoSEConfig(routing="batch"), "MoSEConfig.routing"),
    (lambda: MoSEConfig(r=0), "MoSEConfig.r"),
    (lambda: MoSEConfig(modalities=["text", "text"]), "MoSEConfig.modalities"),
    (lambda: MoSEConfig(adapted_modalities=["video"]), "MoSEConfig.adapted_modalities"),
    (lambda: MoSEConfig(adapted_modalities=["text", "visual"]), "MoSEConfig.dynamic_balance"),
    (lambda: MoSEConfig(weight_clip=[2.0, 1.0]), "MoSEConfig.weight_clip"),
])
def test_bad_configs(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


@pytest.mark.parametrize("ar, message", [
    (ARConfig(balance=["visual", "smell"]), "ARConfig.balance"),
    (ARConfig(balance=["visual"]), "ARConfig.balance: expected at least 2"),
    (ARConfig(target=[1.0]), "ARConfig.target"),
    (ARConfig(modality_bias={"smell": 1.0}), "ARConfig.modality_bias"),
    (ARConfig(modalities=["text", "image", "audio"]), "ARConfig.modalities"),
])
def test_ar_config_checked_against_the_modalities(ar, message):
    with pytest.raises(ValueError, match=message):
        apply_mosear(tiny_llama(), mose=MoSEConfig(r=4), ar=ar)


def test_apply_needs_a_config():
    with pytest.raises(ValueError, match="apply_mosear: got mose=None and ar=None"):
        apply_mosear(tiny_llama())
    with pytest.raises(TypeError, match="mose: expected a MoSEConfig"):
        apply_mosear(tiny_llama(), mose={"r": 4})
