"""The built-in audio-visual LM through the PEFT folder format: PEFT loads its adapter onto the model's
``llm``, folders of the first format (``mose_config.json`` + ``adapter.safetensors``) still load, and
``mosear-predict`` classifies a manifest with it for ``mosear-eval``."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mosear_fast.trained import ADAPTER_CONFIG_FILE, ADAPTER_FILE, adapter_state_dict, load_base, load_trained
from mosear_fast.training import eval_cli, predict_cli
from mosear_fast.training.av_batches import AVCollator
from mosear_fast.training.data import ManifestDataset
from mosear_fast.training.labels import EMOTIONS
from mosear_fast.training.synthetic import generate_camer
from tests.test_export import TINY_SIZES, write_trained_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_trained_folder(tmp_path_factory.mktemp("builtin") / "run")


def inputs(n=3):
    from mosear_fast.av_model import build_demo_model

    return build_demo_model(0, **TINY_SIZES)[1](batch=n, seed=4)


def test_peft_loads_the_adapter_onto_the_models_llm(folder):
    from peft import PeftModel

    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    assert config["peft_type"] == "MOSE" and config["base_model_name_or_path"] is None
    reference = load_trained(folder, ar=False)
    model, llm = load_base(folder)
    PeftModel.from_pretrained(llm, str(folder))  # injects into llm in place
    batch = inputs()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


def test_a_folder_of_the_first_format_still_loads(folder, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    model = load_trained(folder)
    save_file(adapter_state_dict(model), str(old / "adapter.safetensors"))  # the model's own names
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    for key in ("peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision",
                "inference_mode", "task_type"):
        config.pop(key)
    (old / "mose_config.json").write_text(json.dumps(config))
    for name in ("ar_config.json", "backbone.json", "backbone.safetensors"):
        (old / name).write_bytes((folder / name).read_bytes())
    assert not (old / ADAPTER_FILE).exists()
    batch = inputs()
    with torch.no_grad():
        assert torch.equal(load_trained(old)(**batch).logits, model(**batch).logits)


def test_predict_classifies_a_manifest_for_mosear_eval(folder, tmp_path, capsys):
    manifest = generate_camer(n_samples=9, n_visual_tokens=TINY_SIZES["n_visual"], seed=2).write(tmp_path / "data")
    out = tmp_path / "predictions.jsonl"
    assert predict_cli.main([str(folder), "--data", str(manifest), "--out", str(out), "--no-progress",
                             "--batch-size", "4"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model = load_trained(folder)
    dataset = ManifestDataset(manifest, modalities=("visual", "audio"))
    with torch.no_grad():
        logits = model(**AVCollator(with_answers=False)([dataset[i] for i in range(len(dataset))])).logits
    expected = [EMOTIONS[i] for i in model.class_logits(logits).argmax(-1).tolist()]
    assert [r["prediction"] for r in rows] == expected and [r["id"] for r in rows] == [d["id"] for d in dataset.rows]
    assert eval_cli.main(["--labels", str(manifest), "--predictions", str(out), "--out", str(tmp_path / "eval"),
                          "--quiet"]) == 0
    # a restricted label set picks among those only
    assert predict_cli.main([str(folder), "--data", str(manifest), "--out", str(out), "--no-progress",
                             "--labels", "sad,angry"]) == 0
    assert {json.loads(line)["prediction"] for line in out.read_text().splitlines()} <= {"sad", "angry"}
    assert predict_cli.main([str(folder), "--data", str(manifest), "--out", str(out), "--labels", "glum"]) == 2
    assert "--labels: label: 'glum' is not one of" in capsys.readouterr().err
