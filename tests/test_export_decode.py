"""End to end: the --with-past decoder of a tiny Qwen2 with a MoSE adapter and AR (export, greedy decode
check, OnnxGenerator, mosear-generate), the --ops fused graph through onnxruntime-extensions, a bf16
graph the CPU provider cannot run ("not validated", exit 3), and the TensorRT engine build where it
can run. Each export is made once per module (exports take tens of seconds here)."""

import json

import numpy as np
import onnx
import pytest
import torch

from mosear_fast.export import OnnxGenerator, export
from mosear_fast.export.cli import EXIT_NOT_VALIDATED
from mosear_fast.export.cli import main as export_main
from mosear_fast.export.generate_cli import main as generate_main
from mosear_fast.export.tensorrt_build import missing_requirements

pytestmark = pytest.mark.slow
RANGES = dict(batch="1:2:3", seq="1:9:12")


@pytest.fixture(scope="module")
def qwen2_folders(tmp_path_factory):
    from tests.models import save_qwen2_with_adapter

    return save_qwen2_with_adapter(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def decoder(qwen2_folders, tmp_path_factory):
    base_dir, adapter_dir = qwen2_folders
    out = tmp_path_factory.mktemp("decoder") / "out"
    return out, export(base_dir, out, adapter=adapter_dir, with_past=True, **RANGES)


def test_decoder_graph_interface(decoder):
    out, report = decoder
    config = json.loads((out / "export_config.json").read_text())
    names = [i["name"] for i in config["inputs"]]
    assert names == ["input_ids", "attention_mask", "modality_ids", "past_modality_ids", "past_key_values.0.key",
                     "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    shapes = {i["name"]: i["shape"] for i in config["inputs"]}
    assert shapes["attention_mask"] == ["batch", "past_seq + seq"]
    assert shapes["past_key_values.1.value"] == ["batch", 2, "past_seq", 8]
    outputs = {o["name"]: o["shape"] for o in config["outputs"]}
    assert list(outputs) == ["logits", "present_modality_ids", "present.0.key", "present.0.value", "present.1.key",
                             "present.1.value"]
    assert outputs["present.0.key"] == ["batch", 2, "past_seq + seq", 8]
    assert config["dynamic_axes"]["past_seq"] == {"min": 0, "opt": 9, "max": 12}
    assert config["interface"]["kv_cache"]["num_layers"] == 2
    assert "generation_config.json" in report["tokenizer_files"] and (out / "generation_config.json").is_file()
    assert report["tensorrt_lint"]["buildable"], report["tensorrt_lint"]


def test_decoder_validation_and_greedy_decode(decoder):
    _, report = decoder
    validation = report["validation"]
    assert validation["status"] == "passed", validation
    cases = {(e["batch"], e["seq"], e["past"]) for e in validation["shapes"]}
    assert (2, 9, 0) in cases and (2, 1, 9) in cases  # prefill with an empty past, and decode
    for entry in validation["shapes"]:
        assert entry["outputs"]["logits"]["rel_error"] <= 1e-5
        assert entry["outputs"]["present_modality_ids"]["max_abs_diff"] == 0
    check = report["decode_check"]
    assert check["tokens_match"] and check["tokens_equal"] == check["new_tokens"] == 16, check
    assert check["max_step_rel_error"] <= 1e-5 and check["pass"]
    latency = report["latency"]
    for phase in ("prefill", "decode"):
        assert latency[phase]["pytorch_ms"] > 0 and latency[phase]["onnxruntime_ms"] > 0
    assert latency["decode"]["seq"] == 1 and latency["decode"]["past"] == 9


def test_onnx_generator_matches_pytorch_generate(decoder, qwen2_folders):
    from transformers import GenerationConfig

    from mosear_fast.export import load_source

    out, _ = decoder
    module, _ = load_source(qwen2_folders[0], adapter=qwen2_folders[1])
    ids = torch.tensor([[0, 0, 5, 17, 33, 40], [7, 9, 11, 60, 2, 81]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    modality = torch.tensor([[-1, -1, 0, 1, 2, 0], [0, 1, 1, 2, 0, 0]])
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = module.model.generate(ids, attention_mask=mask, modality_ids=modality,
                                         generation_config=config)[:, ids.shape[1]:]
    generator = OnnxGenerator(out)
    tokens = generator.generate(ids, modality, mask, max_new_tokens=6, eos_token_id=None)
    assert generator.provider == "CPUExecutionProvider"
    assert tokens.tolist() == expected.tolist()
    # modality ids reach AR through the cache: other ids for the prompt change the continuation's logits
    _, logits = generator.generate(ids, modality, mask, max_new_tokens=3, eos_token_id=None, return_logits=True)
    _, text_only = generator.generate(ids, None, mask, max_new_tokens=3, eos_token_id=None, return_logits=True)
    assert not np.allclose(logits[2], text_only[2], atol=1e-4)
    # stopping: a row that emits the EOS id is finished and padded
    first = int(tokens[0, 0])
    stopped = generator.generate(ids, modality, mask, max_new_tokens=4, eos_token_id=first)
    assert stopped[0, 0] == first and (stopped[0, 1:] == 0).all()


def test_generate_command(decoder, capsys, tmp_path):
    out, _ = decoder
    code = generate_main([str(out), "--input-ids", "5,17,33;9,11", "--modality-ids", "0,1,2;0,0",
                          "--max-new-tokens", "5", "--no-eos"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [line["prompt"] for line in lines] == [0, 1] and all(len(line["tokens"]) == 5 for line in lines)
    ids = np.array([[5, 17, 33], [0, 9, 11]])
    mask = np.array([[1, 1, 1], [0, 1, 1]])
    modality = np.array([[0, 1, 2], [-1, 0, 0]])
    assert OnnxGenerator(out).generate(ids, modality, mask, max_new_tokens=5, eos_token_id=None).tolist() == [
        line["tokens"] for line in lines]
    for argv, fragment in ((["--input-ids", "1,x"], "--input-ids"), (["--prompt", "hi"], "no tokenizer"),
                           (["--input-ids", "1,2", "--modality-ids", "0"], "--modality-ids"),
                           (["--input-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens")):
        code = generate_main([str(out), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and fragment in err[-1] and "Traceback" not in "".join(err), err
    code = generate_main([str(tmp_path), "--input-ids", "1"])
    assert code == 2 and "export_config.json" in capsys.readouterr().err


def test_fused_ops_graph(qwen2_folders, tmp_path):
    """The fused graph on a Qwen2 whose second layer has a sliding window (5 keys, shorter than the
    validated prompts) with AR balancing by contribution: the options travel as node attributes."""
    import shutil

    from tests.models import tiny_qwen2

    _, trained_adapter = qwen2_folders
    base_dir, adapter_dir = tmp_path / "qwen2-window", tmp_path / "adapter"
    tiny_qwen2(seed=3, use_sliding_window=True, sliding_window=5, max_window_layers=1).save_pretrained(base_dir)
    shutil.copytree(trained_adapter, adapter_dir)
    (adapter_dir / "ar_config.json").write_text(json.dumps({"strength": 0.7, "balance": ["visual", "audio"],
                                                            "balance_by": "contribution",
                                                            "record_shares": False}))
    report = export(base_dir, tmp_path / "fused", adapter=adapter_dir, ops="fused", **RANGES)
    counts = report["op_counts"]
    assert counts["mosear::ARAttention"] == 2 and counts["mosear::MoSELoRA"] == 6  # one per layer / adapted linear
    assert "Softmax" not in counts or counts["Softmax"] == 6  # only the routers' softmax remains
    assert report["validation"]["status"] == "passed", report["validation"]
    assert all(e["provider"] == "CPUExecutionProvider" for e in report["validation"]["shapes"])
    assert report["tensorrt_lint"]["buildable"], report["tensorrt_lint"]  # the plugins are declared
    model = onnx.load(str(tmp_path / "fused" / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "ARAttention"]
    layers = [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} for node in nodes]
    assert all(node.domain == "mosear" for node in nodes) and layers[0]["plugin_namespace"] == b"mosear"
    for attrs in layers:
        assert attrs["strength"] == pytest.approx(0.7) and attrs["balance"] == b"1,2"
        assert attrs["balance_by"] == b"contribution" and attrs["softcap"] == 0.0
    assert sorted(attrs["window"] for attrs in layers) == [0, 5]  # full attention, then the sliding window


def test_bf16_graph_is_not_validated_on_the_cpu(qwen2_folders, tmp_path, capsys, monkeypatch):
    base_dir, adapter_dir = qwen2_folders
    argv = [str(base_dir), "--adapter", str(adapter_dir), "--dtype", "bf16", "--batch", "1:1:2", "--seq", "1:4:6"]
    code = export_main([*argv, "--out", str(tmp_path / "bf16")])
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "bf16" / "report.json").read_text())
    if report["validation"]["status"] != "not validated":
        pytest.skip(f"this onnxruntime runs bf16 graphs on the CPU (status {report['validation']['status']})")
    assert code == EXIT_NOT_VALIDATED, captured.err
    assert "NOT VALIDATED" in captured.err and "--allow-unvalidated" in captured.err
    assert report["validation"]["shapes"][0]["outputs"]["logits"]["not_run"]
    # --allow-unvalidated accepts the same outcome (the export itself is not repeated here)
    import mosear_fast.export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "export", lambda *args, **kwargs: report)
    assert export_main([*argv, "--out", str(tmp_path / "again"), "--allow-unvalidated"]) == 0
    assert export_main([*argv, "--out", str(tmp_path / "again")]) == EXIT_NOT_VALIDATED


def test_tensorrt_engines(qwen2_folders, tmp_path):
    missing = missing_requirements()
    if missing:
        pytest.skip(f"TensorRT engine build needs {' and '.join(missing)}")
    base_dir, adapter_dir = qwen2_folders
    for ops in ("static", "fused"):
        report = export(base_dir, tmp_path / ops, adapter=adapter_dir, format="both", ops=ops, **RANGES)
        engine = report["tensorrt"]
        assert engine["validation"]["pass"], engine["validation"]
        assert engine["tf32"] == "off" and engine["latency_ms"] > 0
