"""What AR cannot honour is refused by apply_mosear (naming the argument and the model, before the model
changes); what only a call can show (a mask AR cannot reproduce, an unknown attention argument) raises at
that call. And the layers AR leaves alone run the attention the model needs (its eager one where sdpa
cannot do what it asks)."""

import pytest
import torch

from mosear_fast import ARConfig, MoSEConfig, apply_mosear
from mosear_fast.hf_attention import op_arguments
from tests.families import FAMILIES
from tests.models import av_prompt, tiny_llama, tiny_qwen2


def rel_err(a, b):
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


def assert_refused_unchanged(model, ar, match):
    """apply_mosear raises ``match`` and leaves the model as it was (attention implementation, no context)."""
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match=match):
        apply_mosear(model, mose=MoSEConfig(r=4), ar=ar)
    assert model.config._attn_implementation == before
    assert getattr(model, "_mosear_context", None) is None
    assert not any(".mose_adapter." in name for name, _ in model.named_parameters())


def test_attention_dropout_is_refused():
    model = tiny_qwen2(attention_dropout=0.1)
    assert_refused_unchanged(model, ARConfig(), r"attention_dropout: Qwen2ForCausalLM layers \[0, 1\] apply "
                                                r"attention dropout \(0.1\)")
    apply_mosear(model, mose=MoSEConfig(r=4))  # MoSE alone is fine


def test_bidirectional_chunked_and_sink_layers_are_refused():
    gemma3 = FAMILIES["Gemma3"]
    bidirectional = gemma3.build()
    for module in bidirectional.modules():
        if hasattr(module, "is_causal") and hasattr(module, "layer_idx"):
            module.is_causal = False
    assert_refused_unchanged(bidirectional, ARConfig(layers=[1]), r"is_causal: Gemma3ForCausalLM layers \[1\] "
                                                                  "attend bidirectionally")
    chunked = tiny_qwen2()
    chunked.config.layer_types = ["full_attention", "chunked_attention"]
    assert_refused_unchanged(chunked, ARConfig(), r"ARConfig.layers: Qwen2ForCausalLM layers \[1\] use "
                                                  "'chunked_attention' attention")
    apply_mosear(chunked, ar=ARConfig(layers=[0]))  # the full-attention layer alone is fine
    sinks = tiny_llama()
    sinks.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    assert_refused_unchanged(sinks, ARConfig(), r"s_aux: LlamaForCausalLM layers \[0\] use attention sinks")


def test_image_token_blocks_are_refused():
    assert_refused_unchanged(FAMILIES["Gemma3 (vision)"].build(), ARConfig(),
                             "token_type_ids: Gemma3ForConditionalGeneration gives the tokens of each image "
                             "bidirectional attention")


@pytest.mark.parametrize("family, argument, layers", [
    ("Mistral", r"sliding_window: MistralForCausalLM layers \[0, 1\] use sliding_window=6", None),
    ("Qwen2 (sliding)", r"sliding_window: Qwen2ForCausalLM layers \[1\] use sliding_window=6", None),
    ("Gemma2", r"softcap: Gemma2ForCausalLM layers \[1\] use softcap=50.0", [1]),
])
def test_window_and_softcap_are_refused_without_op_support(monkeypatch, family, argument, layers):
    """An ar_attention without window/softcap: the layers that need them are refused (never ignored)."""
    monkeypatch.setattr("mosear_fast.apply.op_arguments", lambda: frozenset())
    assert_refused_unchanged(FAMILIES[family].build(), ARConfig(layers=layers), argument)


def _needs(*names):
    missing = set(names) - op_arguments()
    return pytest.mark.skipif(bool(missing), reason=f"the installed ar_attention lacks {sorted(missing)} "
                                                    "(DESIGN 2.2b, the AR semantics issue)")


@_needs("softcap", "window")
def test_layers_without_ar_run_the_models_eager_attention_with_softcap():
    """Gemma2 (softcap 50, eager by default) with AR on layer 1 only: layer 0 runs Gemma2's own eager
    attention (sdpa refuses softcap), and at strength 0 the logits are the model's own."""
    family = FAMILIES["Gemma2"]
    reference = family.build()
    model = apply_mosear(family.build(), ar=ARConfig(strength=0.0, layers=[1]))
    assert model.config._attn_implementation == "mosear_ar_eager"
    inputs = family.inputs(reference)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        assert rel_err(model(**inputs).logits[real], reference(**inputs).logits[real]) < 1e-5


def test_an_eager_model_keeps_eager_attention_on_the_other_layers():
    reference = tiny_llama(attn_implementation="eager")
    model = apply_mosear(tiny_llama(attn_implementation="eager"), ar=ARConfig(strength=0.0, layers=[1]))
    assert model.config._attn_implementation == "mosear_ar_eager"
    ids, mask, modality = av_prompt(2, 12, left_pad=[0, 3])
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, modality_ids=modality).logits
        expected = reference(input_ids=ids, attention_mask=mask).logits
    assert rel_err(got[mask.bool()], expected[mask.bool()]) < 1e-5


@pytest.fixture
def ar_model():
    return apply_mosear(tiny_qwen2(), ar=ARConfig(strength=0.5))


def test_masks_ar_cannot_reproduce_raise_at_the_call(ar_model):
    ids, mask, modality = av_prompt(2, 12, left_pad=[0, 3])
    everything = torch.ones(2, 1, 12, 12, dtype=torch.bool)  # a custom bidirectional 4-D mask
    with pytest.raises(ValueError, match=r"attention_mask: layer 0 of Qwen2ForCausalLM was given a mask that AR "
                                         r"attention cannot reproduce: \d+ query-key pairs differ"):
        ar_model(input_ids=ids, attention_mask=everything, modality_ids=modality)
    packed = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])  # two sequences in one row
    with pytest.raises(ValueError, match="packed sequences"):
        ar_model(input_ids=ids[:1], position_ids=packed, modality_ids=modality[:1], use_cache=False)
    hidden = modality.clone()
    hidden[0, 5] = -1  # a real token marked -1: AR would hide it, the model's mask shows it
    with pytest.raises(ValueError, match="modality id -1 on tokens the mask does not pad"):
        ar_model(input_ids=ids, attention_mask=mask, modality_ids=hidden)


def test_unknown_attention_arguments_raise(ar_model):
    ids, mask, modality = av_prompt(1, 8)
    with pytest.raises(ValueError, match=r"attention arguments: layer 0 of Qwen2ForCausalLM passed "
                                         r"\['position_bias'\]"):
        ar_model(input_ids=ids, attention_mask=mask, modality_ids=modality, position_bias=torch.zeros(1))
