"""mosear-train --model on an audio-visual model folder: the Qwen2.5-Omni thinker (tiny random config of the
support matrix, ``tests/families.py``). Rows in the input_ids form as its processor makes them (placeholders
expanded), the audio and video inputs as one safetensors file per row, no modality ids: they come from the
placeholder tokens its config names. Then load_trained, PEFT and mosear-predict with labels. A whole Omni
checkpoint (thinker + talker) trains its thinker."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mosear_fast.trained import load_trained
from mosear_fast.training import predict_cli, train_cli
from tests.families import AUDIO, FAMILIES, IMAGE, VIDEO

ANSWER = 2  # tokens at the end of each prompt that are the answer


def word_level_tokenizer(vocab_size: int):
    """A tokenizer whose word ``t<i>`` is token i (the tiny model has no tokenizer of its own)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t1"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t1", pad_token="t0")


def per_sample(inputs: dict, b: int) -> dict:
    """Sample b's multimodal inputs as its processor returns them for it alone (leading dim: its items)."""
    grid = inputs["video_grid_thw"]
    patches = grid.prod(-1).tolist()
    start = sum(patches[:b])
    return {"pixel_values_videos": inputs["pixel_values_videos"][start:start + patches[b]].contiguous(),
            "video_grid_thw": grid[b:b + 1].contiguous(),
            "video_second_per_grid": inputs["video_second_per_grid"][b:b + 1].contiguous(),
            "input_features": inputs["input_features"][b:b + 1].contiguous(),
            "feature_attention_mask": inputs["feature_attention_mask"][b:b + 1].contiguous()}


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    family = FAMILIES["Qwen2.5-Omni thinker"]
    model = family.build()
    model.save_pretrained(str(root / "model"))
    word_level_tokenizer(model.config.get_text_config().vocab_size).save_pretrained(str(root / "model"))
    inputs = family.inputs(model)
    rows = []
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
        save_file(per_sample(inputs, b), str(root / f"s{b}.safetensors"))
        rows.append({"id": f"s{b}", "input_ids": ids, "labels": [-100] * (len(ids) - ANSWER) + ids[-ANSWER:],
                     "features": f"s{b}.safetensors"})
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "out"
    assert train_cli.main(["--model", str(root / "model"), "--train-data", str(root / "rows.jsonl"),
                           "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2", "--rank", "4",
                           "--num-experts", "2", "--learning-rate", "0.05", "--logging-steps", "1",
                           "--ar-training", "true", "--progress", "false"]) == 0
    return root, rows, out


def test_the_thinker_trains_with_modality_ids_from_its_placeholders(omni):
    root, rows, out = omni
    backbone = json.loads((out / "backbone.json").read_text())
    assert backbone["class"] == "Qwen2_5OmniThinkerForConditionalGeneration"
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    # AR ran while fitting and saw visual and audio keys: the ids came from the video/audio placeholders
    assert logs and all(h["attention_share/visual"] > 0 and h["attention_share/audio"] > 0 for h in logs)
    assert all(h["modality_weight/visual"] != 1 or h["modality_weight/audio"] != 1 for h in logs[1:])
    model = load_trained(out)
    assert model._mosear_context.placeholder_tokens == {1: (IMAGE, VIDEO), 2: (AUDIO,)}


def test_predict_scores_labels_after_the_multimodal_prompt(omni, tmp_path):
    root, rows, out = omni
    labels = [f"t{rows[0]['input_ids'][-ANSWER]}", f"t{rows[1]['input_ids'][-ANSWER]}", "t50"]
    predictions = tmp_path / "p.jsonl"
    assert predict_cli.main([str(out), "--data", str(root / "rows.jsonl"), "--out", str(predictions),
                             "--labels", ",".join(dict.fromkeys(labels)), "--no-progress"]) == 0
    got = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["id"] for r in got] == ["s0", "s1"]
    assert all(set(r["scores"]) == set(dict.fromkeys(labels)) for r in got)
    assert got[0]["scores"] != got[1]["scores"]  # each row scored after its own audio and video


def test_peft_and_load_trained_give_the_same_thinker(omni):
    from peft import PeftModel
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    root, rows, out = omni
    inputs = FAMILIES["Qwen2.5-Omni thinker"].inputs(None)
    base = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(root / "model"), attn_implementation="sdpa")
    with torch.no_grad():
        plain = base(**inputs).logits
        peft_logits = PeftModel.from_pretrained(base, str(out))(**inputs).logits
        mose = load_trained(out, ar=False)(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert torch.equal(peft_logits[real], mose[real])
    assert not torch.allclose(mose[real], plain[real], atol=1e-4)  # the trained adapter changes the thinker


def test_a_whole_omni_checkpoint_trains_its_thinker(tmp_path):
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    from mosear_fast.base_model import base_reference, load_base_model

    thinker_config = FAMILIES["Qwen2.5-Omni thinker"].build_config()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        whole = Qwen2_5OmniForConditionalGeneration(
            Qwen2_5OmniConfig(thinker_config=thinker_config.to_dict(), enable_audio_output=False))
    whole.save_pretrained(str(tmp_path / "omni"))
    reference = base_reference(tmp_path / "omni")
    assert reference["class"] == "Qwen2_5OmniThinkerForConditionalGeneration"
    thinker = load_base_model(reference)
    expected = whole.thinker.state_dict()
    assert thinker.state_dict().keys() == expected.keys()
    assert all(torch.equal(t, expected[name]) for name, t in thinker.state_dict().items())
