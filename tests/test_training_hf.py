"""mosear-train --model on a Hugging Face model folder, then mosear-predict, mosear-eval and mosear-export on
its output: the README's "Fit MoSE on your model" chain, on the example folder it builds
(``python -m mosear_fast.training.example_model``). The output folder is a PEFT adapter folder:
``PeftModel.from_pretrained`` (after a plain ``import mosear_fast``) and ``load_trained`` give the same
model. Bad settings and rows are one-line errors that leave nothing behind."""

import json
import subprocess
import sys

import pytest
import torch

from mosear_fast.training import eval_cli, predict_cli, train_cli
from mosear_fast.training.example_model import EMOTION_CUES, write_example
from mosear_fast.training.trained_folder import load_trained

LABELS = ",".join(EMOTION_CUES)
TRAIN = ["--max-steps", "4", "--batch-size", "8", "--rank", "4", "--num-experts", "2", "--learning-rate", "0.01",
         "--save-steps", "2", "--logging-steps", "2", "--progress", "false", "--ar-strength", "0.5",
         "--ar-training", "true"]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_example(tmp_path_factory.mktemp("example"), seed=1)


@pytest.fixture(scope="module")
def trained(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "out"
    assert train_cli.main(["--model", str(example["model"]), "--train-data", str(example["train"]),
                           "--output-dir", str(out), *TRAIN]) == 0
    return out


def test_output_folder_is_a_peft_adapter_folder(example, trained):
    from safetensors.torch import load_file

    names = {p.name for p in trained.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "ar_config.json", "backbone.json",
            "trainer_state.json", "checkpoint-2", "checkpoint-4"} <= names
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOSE" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["base_model_name_or_path"] == str(example["model"].resolve())
    assert json.loads((trained / "backbone.json").read_text()) == {
        "format": "transformers-folder/1", "path": str(example["model"].resolve()), "class": "LlamaForCausalLM"}
    assert json.loads((trained / "ar_config.json").read_text())["strength"] == 0.5
    tensors = load_file(str(trained / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") and ".mose_adapter." in k for k in tensors)
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"A", "B", "router_weight", "router_bias", "update_norm_ema",
                                                      "modality_weight"}
    assert any(float(t.abs().sum()) > 0 for k, t in tensors.items() if k.endswith(".B"))  # trained
    logs = [h for h in json.loads((trained / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    # --ar-training: AR ran while fitting, and saw visual and audio keys: the rows have no modality ids, the
    # <video>/<audio> placeholders the model's config names gave them
    assert logs and all(h["attention_share/visual"] > 0 and h["attention_share/audio"] > 0 for h in logs)
    checkpoint = trained / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors", "backbone.json", "optimizer.pt"} <= \
        {p.name for p in checkpoint.iterdir()}
    assert not torch.equal(load_file(str(checkpoint / "adapter_model.safetensors"))[next(iter(tensors))],
                           tensors[next(iter(tensors))])
    load_trained(checkpoint)


def test_peft_from_pretrained_and_load_trained_give_the_same_model(example, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 4, 6, 7, 8, 20, 5, 6, 9, 8, 23, 10, 11, 12, 13]])  # <video> at 1, <audio> at 6
    modality = torch.tensor([[0, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(example["model"]))
        plain = base(input_ids=ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(trained))(input_ids=ids, modality_ids=modality).logits
        mose = load_trained(trained, ar=False)(input_ids=ids, modality_ids=modality).logits
        mose_ar = load_trained(trained)(input_ids=ids, modality_ids=modality).logits
    assert torch.equal(peft_logits, mose)
    with torch.no_grad():  # without ids, the placeholders of the model's config give the same ones
        assert torch.equal(load_trained(trained)(input_ids=ids).logits, mose_ar)
    assert not torch.allclose(mose, plain, atol=1e-3)  # the adapter changes the model
    assert not torch.allclose(mose_ar, mose, atol=1e-4)  # and the folder's AR config too


def test_a_plain_import_registers_mose_with_peft(trained):
    # A fresh interpreter: importing mosear_fast must not import peft, yet a later PEFT load finds "MOSE".
    code = ("import sys, mosear_fast; assert 'peft' not in sys.modules; from peft import PeftConfig; "
            f"print(type(PeftConfig.from_pretrained({str(trained)!r})).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "MoSEConfig", result.stderr[-2000:]


def test_predict_with_labels_feeds_mosear_eval(example, trained, tmp_path, capsys):
    predictions = tmp_path / "predictions.jsonl"
    assert predict_cli.main([str(trained), "--data", str(example["test"]), "--out", str(predictions),
                             "--labels", LABELS, "--batch-size", "5", "--no-progress"]) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    test_ids = [json.loads(line)["id"] for line in example["test"].read_text().splitlines()]
    assert [r["id"] for r in rows] == test_ids
    for row in rows:
        assert row["prediction"] in EMOTION_CUES and list(row["scores"]) == list(EMOTION_CUES)
        assert row["prediction"] == max(row["scores"], key=row["scores"].get)
        assert all(s < 0 for s in row["scores"].values())  # log-probabilities
    assert eval_cli.main(["--labels", str(example["labels"]), "--predictions", str(predictions), "--out",
                          str(tmp_path / "eval"), "--quiet"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert sum(s["n"] for s in report["subsets"].values()) == len(rows) and not report["problems"]


def test_predict_without_labels_generates_text(example, trained, tmp_path):
    data = tmp_path / "three.jsonl"
    data.write_text("".join(example["test"].read_text().splitlines(keepends=True)[:3]))
    out = tmp_path / "generated.jsonl"
    assert predict_cli.main([str(trained), "--data", str(data), "--out", str(out), "--max-new-tokens", "2",
                             "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["prediction"], str) and "scores" not in r for r in rows)


@pytest.mark.slow
def test_export_of_the_trained_folder_prefill_and_with_past(trained, tmp_path, capsys):
    from mosear_fast.export import cli as export_cli

    for name, extra in (("prefill", []), ("decoder", ["--with-past", "--past", "0:4:8"])):
        out = tmp_path / name
        assert export_cli.main([str(trained), "--out", str(out), "--batch", "1:1:2", "--seq", "2:8:16",
                                *extra]) == 0, capsys.readouterr().err
        report = json.loads((out / "report.json").read_text())
        assert report["validation"]["status"] == "passed" and report["with_past"] == bool(extra)
        assert {"model.onnx", "tokenizer.json", "export_config.json"} <= {p.name for p in out.iterdir()}


# ---- one-line errors, nothing written ---------------------------------------------------------------------------


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "{tmp}/nowhere"], "model: {tmp}/nowhere is not a folder"),
    (["--model", "{model}", "--backbone-sizes", '{{"hidden": 32}}', "--train-data", "{train}"],
     "backbone_sizes: applies to the built-in model only"),
    (["--model", "{model}"], "train_data: with --model, expected a JSONL file of rows"),
    (["--model", "{model}", "--train-data", "{bad}"], "{bad}: line 2: answer: a training row of the prompt form"),
    (["--model", "{model}", "--train-data", "{train}", "--ar", "false", "--ar-training", "true"],
     "ar_training: needs ar true"),
])
def test_bad_settings_and_rows_are_one_line_errors(example, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "the face", "answer": "happy"}\n{"id": 2, "prompt": "the face"}\n')
    names = dict(tmp=tmp_path, model=example["model"], train=example["train"], bad=bad)
    before = _tree(tmp_path)
    argv = [a.format(**names) for a in args]
    assert train_cli.main([*argv, "--output-dir", str(tmp_path / "out"), "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mosear-train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message.format(**names) in err, err
    assert _tree(tmp_path) == before


def test_predict_errors_are_one_line(example, trained, tmp_path, capsys):
    test = str(example["test"])
    cases = [([str(tmp_path), "--data", test], "backbone.json"),
             ([str(trained), "--data", str(tmp_path / "none.jsonl")], "--data: "),
             ([str(trained), "--data", test, "--labels", "happy,,happy"], "--labels: expected distinct"),
             ([str(trained), "--data", test, "--batch-size", "0"], "--batch-size: expected a positive")]
    for argv, message in cases:
        assert predict_cli.main([*argv, "--out", str(tmp_path / "p.jsonl"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mosear-predict: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "p.jsonl").exists()
