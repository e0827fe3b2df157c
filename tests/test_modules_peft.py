"""MoSE as a PEFT method: get_peft_model, trainable parameters, save/load round trip (safetensors)."""

import os

import pytest
import torch
from peft import PeftModel, get_peft_model

from mosear_fast import ARConfig, MoSEConfig, apply_mosear, attention_shares
from tests.models import av_prompt, tiny_qwen2


def peft_model(**config):
    options = dict(task_type="CAUSAL_LM", r=4, num_experts=3, top_k=2, init_weights=False,
                   target_modules=["q_proj", "v_proj"])
    options.update(config)
    torch.manual_seed(2)
    return get_peft_model(tiny_qwen2(), MoSEConfig(**options))


def test_only_adapters_and_routers_are_trainable():
    model = peft_model()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".mose_adapter.default." in name for name in trainable)
    kinds = {name.rsplit(".", 1)[-1] for name in trainable}
    assert kinds == {"A", "B", "router_weight", "router_bias"}
    assert len(trainable) == 4 * 2 * 2  # 4 tensors x (q_proj, v_proj) x 2 layers


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_save_and_load_reproduce_the_outputs_exactly(tmp_path, routing):
    model = peft_model(routing=routing)
    ids, mask, modality = av_prompt(2, 12, left_pad=[0, 2])
    model.train()
    for _ in range(2):  # move the dynamic weights off 1 so the buffers must round-trip too
        model(input_ids=ids, attention_mask=mask, modality_ids=modality)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, modality_ids=modality).logits
    weights = [m.mose_adapter["default"].modality_weight for m in model.modules()
               if hasattr(m, "mose_adapter")]
    assert any(not torch.equal(w, torch.ones_like(w)) for w in weights)

    model.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "adapter_model.safetensors")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("modality_weight") for k in saved)
    assert any(k.endswith("router_weight") for k in saved)
    assert not any("base_layer" in k for k in saved)

    loaded = PeftModel.from_pretrained(tiny_qwen2(), tmp_path)
    with torch.no_grad():
        logits = loaded(input_ids=ids, attention_mask=mask, modality_ids=modality).logits
    assert torch.equal(logits, expected)
    tokens = loaded.generate(input_ids=ids, attention_mask=mask, modality_ids=modality, max_new_tokens=3,
                             do_sample=False, pad_token_id=0)
    assert tokens.shape == (2, 15)


def test_ar_on_top_of_a_peft_model():
    model = peft_model().eval()
    apply_mosear(model, ar=ARConfig(strength=0.5, layers=[1]))
    ids, mask, modality = av_prompt(1, 12)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, modality_ids=modality)
    assert sorted(attention_shares(model)) == [1]
