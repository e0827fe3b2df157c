"""ARConfig.calibrate and ARConfig.layer_targets: targets per layer and head measured on a model
(against a naive computation from the eager attention probabilities), and per-layer targets
reaching each layer's ``ar_attention`` call."""

import json

import pytest
import torch

from mosear_fast import ARConfig, apply_mosear
from mosear_fast import hf_attention as hf_attention_module
from tests.models import av_prompt, tiny_qwen2

BALANCE = (1, 2)


def _batches():
    out = []
    for seed, pads in ((0, [0, 3]), (1, [2, 0])):
        ids, mask, modality = av_prompt(2, 14, seed=seed, left_pad=pads)
        out.append({"input_ids": ids, "attention_mask": mask, "modality_ids": modality})
    return out


def _naive_targets(model, batches, balance_by):
    """Per layer and head: the mean over text queries that see visual and audio keys of the shares of
    P_m (or P_m * ||vbar_m||), from the eager attention probabilities and the value projections."""
    n_layers = model.config.num_hidden_layers
    values = {}
    hooks = [model.model.layers[i].self_attn.v_proj.register_forward_hook(
        lambda mod, inp, out, i=i: values.__setitem__(i, out)) for i in range(n_layers)]
    sums, counts = {}, {}
    with torch.no_grad():
        for batch in batches:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_attentions=True, use_cache=False)
            ids = batch["modality_ids"]
            for layer, p in enumerate(out.attentions):  # [B, Hq, L, L]
                p = p.double()
                b, hq, length, _ = p.shape
                head_dim = model.config.hidden_size // model.config.num_attention_heads
                v = values[layer].double().view(b, length, -1, head_dim)
                v = v.repeat_interleave(hq // v.shape[2], dim=2).transpose(1, 2)  # [B, Hq, L, D]
                amounts = []
                for m in BALANCE:
                    in_m = (ids == m).double()[:, None, None, :]
                    mass = (p * in_m).sum(-1)  # [B, Hq, L]
                    if balance_by == "contribution":
                        vbar = (p * in_m) @ v / mass.clamp_min(1e-300).unsqueeze(-1)
                        mass = mass * vbar.norm(dim=-1)
                    amounts.append(mass)
                amount = torch.stack(amounts, -1)  # [B, Hq, L, 2]
                valid = (ids == 0)[:, None, :] & (amount > 0).all(-1)
                shares = amount / amount.sum(-1, keepdim=True).clamp_min(1e-300)
                sums[layer] = sums.get(layer, 0) + (shares * valid.unsqueeze(-1)).sum((0, 2))
                counts[layer] = counts.get(layer, 0) + valid.sum((0, 2))
    for h in hooks:
        h.remove()
    return {layer: sums[layer] / counts[layer].unsqueeze(-1) for layer in sums}


@pytest.mark.parametrize("balance_by", ["mass", "contribution"])
def test_calibrated_targets_match_a_naive_measurement_and_leave_the_model_as_it_was(balance_by):
    model = tiny_qwen2(attn_implementation="eager")  # GQA: 4 query heads read 2 KV heads
    batches = _batches()
    config = ARConfig(balance_by=balance_by, record_shares=False, strength=0.7)
    calibrated = config.calibrate(model, batches)
    assert model.config._attn_implementation == "eager" and not model.training
    assert calibrated.strength == 0.7 and calibrated.target is None and calibrated.balance_by == balance_by
    expected = _naive_targets(model, batches, balance_by)
    assert sorted(calibrated.layer_targets) == [0, 1]
    for layer, target in calibrated.layer_targets.items():
        got = torch.tensor(target, dtype=torch.float64)
        assert got.shape == (4, 2)
        torch.testing.assert_close(got, expected[layer], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected[0], expected[0][0].expand(4, -1))  # heads differ: per-head matters


def test_calibrate_keeps_an_installed_ar_and_only_measures_its_layers():
    model = apply_mosear(tiny_qwen2(), ar=ARConfig(layers=[1], strength=0.4))
    before = dict(model._mosear_context.ar)
    calibrated = ARConfig(layers=[1], record_shares=False).calibrate(model, _batches()[:1])
    assert list(calibrated.layer_targets) == [1]
    assert model.config._attn_implementation == "mosear_ar" and model._mosear_context.ar == before
    with pytest.raises(ValueError, match="batches"):
        ARConfig(record_shares=False).calibrate(model, [])
    with pytest.raises(ValueError, match="model"):
        ARConfig(record_shares=False).calibrate(torch.nn.Linear(2, 2), _batches())


def test_layer_targets_reach_each_layers_attention_call(monkeypatch):
    seen = {}
    real = hf_attention_module.ar_attention

    def spy(*args, **kwargs):
        seen[len(seen)] = kwargs["target"]
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_attention_module, "ar_attention", spy)
    per_head = [[1.0, 3.0], [1.0, 1.0], [2.0, 2.0], [3.0, 1.0]]
    config = ARConfig(target=(1.0, 4.0), layer_targets={"1": torch.tensor(per_head)}, record_shares=False)
    assert config.layer_targets == {1: tuple(tuple(r) for r in per_head)}  # JSON keys and tensors accepted
    model = apply_mosear(tiny_qwen2(), ar=config)
    ids, mask, modality = av_prompt(2, 12)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, modality_ids=modality)
    assert seen[0] == (0.2, 0.8)  # layer 0: the config's target
    assert seen[1] == ((0.25, 0.75), (0.5, 0.5), (0.5, 0.5), (0.75, 0.25))  # layer 1: its own, normalised
    again = ARConfig(**json.loads(json.dumps(config.__dict__)))  # the JSON round trip of ar_config.json
    assert again.resolve(("text", "visual", "audio"))["layer_targets"] == \
        config.resolve(("text", "visual", "audio"))["layer_targets"]


@pytest.mark.parametrize(("fields", "error", "match"), [
    (dict(layer_targets=[(1.0, 1.0)], record_shares=False), TypeError, "layer_targets"),
    (dict(layer_targets={-1: (1.0, 1.0)}, record_shares=False), ValueError, "layer_targets"),
    (dict(layer_targets={"x": (1.0, 1.0)}, record_shares=False), ValueError, "layer_targets"),
    (dict(layer_targets={0: (1.0, 1.0)}), ValueError, "record_shares"),
])
def test_bad_layer_targets_name_the_field(fields, error, match):
    with pytest.raises(error, match=match):
        ARConfig(**fields)


def test_a_bad_layer_target_is_refused_when_resolved():
    with pytest.raises(ValueError, match=r"layer_targets\[0\]"):
        ARConfig(layer_targets={0: (1.0, 0.0)}, record_shares=False).resolve(("text", "visual", "audio"))
