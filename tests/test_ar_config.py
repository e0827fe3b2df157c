"""ARConfig's DESIGN 2.2b fields (balance_by, per-head targets): validation, JSON form, and what
reaches ``ar_attention`` from a model prepared with ``apply_mosear``."""

import json

import pytest
import torch

from mosear_fast import ARConfig, apply_mosear
from mosear_fast import hf_attention as hf_attention_module
from tests.models import av_prompt, tiny_qwen2


def _resolved_target(**fields):
    return ARConfig(**fields).resolve(("text", "visual", "audio"))["target"]


def test_targets_are_checked_and_normalised_when_resolved():
    assert _resolved_target(target=(3.0, 1.0)) == (0.75, 0.25)
    assert _resolved_target(target=(1e-300, 1e300)) == (0.0, 1.0)
    per_head = _resolved_target(target=torch.tensor([[1.0, 1.0], [1.0, 3.0]]), record_shares=False)
    assert per_head == ((0.5, 0.5), (0.25, 0.75))
    assert _resolved_target(target=[[1, 1], [1, 3]], record_shares=False) == per_head  # nested sequences alike
    assert ARConfig(target=torch.tensor([1.0, 2.0])).target == (1.0, 2.0)  # a tensor is kept as plain floats


BAD_CONFIGS = [
    (dict(target=(1.0, 0.0)), ValueError, "ARConfig.target"),
    (dict(target=(1.0, float("nan"))), ValueError, "ARConfig.target"),
    (dict(target=(1.0, 2.0, 3.0)), ValueError, "ARConfig.target"),
    (dict(target=torch.ones(2, 3), record_shares=False), ValueError, "ARConfig.target"),
    (dict(target=torch.tensor([[1.0, -1.0]]), record_shares=False), ValueError, r"ARConfig.target\[0\]"),
    (dict(target="ab"), TypeError, "ARConfig.target"),
    (dict(balance_by="norm"), ValueError, "ARConfig.balance_by"),
    (dict(balance_by=None), TypeError, "ARConfig.balance_by"),
    (dict(balance_by="contribution"), ValueError, "ARConfig.record_shares"),  # the interim limit
    (dict(target=((1.0, 1.0), (1.0, 2.0))), ValueError, "ARConfig.record_shares"),
    (dict(target=torch.ones(4, 2)), ValueError, "ARConfig.record_shares"),
]


@pytest.mark.parametrize("fields,error,name", BAD_CONFIGS)
def test_bad_fields_name_themselves(fields, error, name):
    with pytest.raises(error, match=name):
        _resolved_target(**fields)


def test_config_round_trips_through_json():
    config = ARConfig(target=torch.tensor([[2.0, 1.0], [1.0, 1.0]]), balance_by="contribution", record_shares=False)
    fields = json.loads(json.dumps({k: getattr(config, k) for k in ("target", "balance_by", "record_shares")}))
    again = ARConfig(**fields)
    names = ("text", "visual", "audio")
    assert again.resolve(names)["target"] == config.resolve(names)["target"] == ((2 / 3, 1 / 3), (0.5, 0.5))
    assert again.balance_by == "contribution"


def _logits(ar, monkeypatch=None, seen=None):
    model = apply_mosear(tiny_qwen2(), ar=ar)  # 4 query heads, 2 KV heads
    if monkeypatch is not None:
        real = hf_attention_module.ar_attention

        def spy(*args, **kwargs):
            seen.append({k: kwargs[k] for k in ("balance_by", "target")})
            return real(*args, **kwargs)

        monkeypatch.setattr(hf_attention_module, "ar_attention", spy)
    ids, _, modality = av_prompt(2, 16, n_visual=8, n_audio=2)
    with torch.no_grad():
        return model(input_ids=ids, modality_ids=modality).logits


def test_balance_by_and_per_head_targets_reach_the_op(monkeypatch):
    seen = []
    head_target = ((1.0, 1.0), (1.0, 4.0), (4.0, 1.0), (1.0, 2.0))
    by_contribution = _logits(ARConfig(strength=1.0, balance_by="contribution", target=head_target,
                                       record_shares=False), monkeypatch, seen)
    assert seen and all(s["balance_by"] == "contribution" for s in seen)
    assert all(s["target"] == ((0.5, 0.5), (0.2, 0.8), (0.8, 0.2), (1 / 3, 2 / 3)) for s in seen)
    by_mass = _logits(ARConfig(strength=1.0, target=head_target, record_shares=False))
    assert (by_contribution - by_mass).abs().max() > 1e-4


def test_per_head_targets_with_equal_rows_equal_one_target():
    one = _logits(ARConfig(strength=1.0, target=(1.0, 3.0)))
    rows = _logits(ARConfig(strength=1.0, target=((1.0, 3.0),) * 4, record_shares=False))
    assert torch.allclose(one, rows, atol=1e-6)
    other = _logits(ARConfig(strength=1.0, target=((1.0, 3.0),) * 3 + ((3.0, 1.0),), record_shares=False))
    assert (other - one).abs().max() > 1e-4


def test_per_head_target_of_the_wrong_head_count_is_refused_naming_target():
    with pytest.raises(ValueError, match="target"):
        _logits(ARConfig(target=((1.0, 3.0),) * 3, record_shares=False))
