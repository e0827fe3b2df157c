"""mosear-export end to end: the demo model and a tiny Qwen2 with a saved MoSE adapter and AR, onnxruntime
parity on several shapes (batch 1, odd lengths), fp16, the output folder, and no partial output on failure."""

import json

import onnx
import pytest
import torch

from mosear_fast.export import export, load_source
from mosear_fast.export import pipeline as pipeline_module
from mosear_fast.export.sources import ExportModule, build_demo_model, example_inputs
from mosear_fast.export.validate import ort_session

SMALL = dict(batch="1:2:3", seq="1:8:24")


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "demo"
    report = export("demo", out, **SMALL)
    return out, report


def test_demo_export_files_and_config(demo_export):
    out, report = demo_export
    assert sorted(p.name for p in out.iterdir()) == ["export_config.json", "model.onnx", "report.json"]
    config = json.loads((out / "export_config.json").read_text())
    inputs = {i["name"]: i for i in config["inputs"]}
    assert inputs["input_ids"] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"],
                                   "range": [0, 128], "range_note": "valid values are [low, high)"}
    assert inputs["attention_mask"]["range"] == [0, 2] and inputs["modality_ids"]["range"] == [-1, 3]
    assert config["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", 128]}]
    assert config["dynamic_axes"] == {"batch": {"min": 1, "opt": 2, "max": 3}, "seq": {"min": 1, "opt": 8, "max": 24}}
    assert json.loads((out / "report.json").read_text())["validation"]["pass"] == report["validation"]["pass"]


def test_demo_export_report(demo_export):
    _, report = demo_export
    validation = report["validation"]
    assert validation["pass"] and not validation["hard_fail"]
    shapes = {(s["batch"], s["seq"]) for s in validation["shapes"]}
    assert (1, 1) in shapes and (3, 24) in shapes and any(t % 2 == 1 and t > 1 for _, t in shapes)
    for entry in validation["shapes"]:
        logits = entry["outputs"]["logits"]
        assert logits["rel_error"] <= 1e-5 and logits["max_abs_diff"] >= 0 and "max_rel_diff" in logits
    assert report["tensorrt_lint"] == {"version": "10.15", "buildable": True, "problems": []}
    assert {"NonZero", "ScatterND", "Loop", "If"}.isdisjoint(report["ops"]) and report["ops"]["TopK"] >= 1
    latency = report["latency"]
    assert latency["pytorch_ms"] > 0 and latency["onnxruntime_ms"] > 0
    assert latency["onnxruntime_provider"] == "CPUExecutionProvider"


def test_demo_graph_runs_other_shapes_like_the_module(demo_export):
    out, _ = demo_export
    module, example = load_source("demo")
    assert isinstance(module, ExportModule) and len(example) == 3
    session = ort_session(out / "model.onnx")
    for batch, length in [(1, 7), (3, 1), (2, 23)]:
        inputs = example_inputs(module, batch, length, seed=9)
        with torch.no_grad():
            expected = module(*inputs)
        actual = session.run(None, dict(zip(["input_ids", "attention_mask", "modality_ids"],
                                            (t.numpy() for t in inputs))))[0]
        assert actual.shape == (batch, length, 128)
        err = (torch.from_numpy(actual) - expected).norm() / expected.norm()
        assert err < 1e-5


def test_demo_model_is_deterministic_and_adapters_matter():
    first, second = build_demo_model(), build_demo_model()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    module = ExportModule(first)
    ids, mask, modality = example_inputs(module, 2, 12)
    with torch.no_grad():
        with_ids = module(ids, mask, modality)
        text_only = module(ids, mask, torch.zeros_like(modality).masked_fill(mask == 0, -1))
    assert not torch.allclose(with_ids, text_only)  # the modality ids change experts and AR


def test_existing_output_needs_overwrite_and_failure_leaves_it_intact(demo_export, tmp_path, monkeypatch):
    out = tmp_path / "again"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="--overwrite"):
        export("demo", out, **SMALL)

    def half_written_graph(module, path, **kwargs):
        path.write_bytes(b"partial graph")  # the failure strikes after a file is written
        raise RuntimeError("forced failure")

    monkeypatch.setattr(pipeline_module.graph, "export_onnx", half_written_graph)
    with pytest.raises(RuntimeError, match="forced failure"):
        export("demo", out, overwrite=True, **SMALL)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no staging folder left behind
    with pytest.raises(RuntimeError, match="forced failure"):
        export("demo", tmp_path / "fresh", **SMALL)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.slow
def test_fp16_export(tmp_path):
    report = export("demo", tmp_path / "fp16", dtype="fp16", batch="1:2:2", seq="3:5:9")
    assert report["validation"]["pass"], report["validation"]
    assert report["validation"]["tolerance"]["rel_error_max"] == 5e-3
    model = onnx.load(str(tmp_path / "fp16" / "model.onnx"), load_external_data=False)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    # router softmax and TopK stay in float32 in the low-precision graph
    values = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    topk_inputs = [n.input[0] for n in model.graph.node if n.op_type == "TopK"]
    assert topk_inputs and all(values.get(name) == onnx.TensorProto.FLOAT for name in topk_inputs)


@pytest.fixture
def qwen2_with_adapter(tmp_path):
    from peft import get_peft_model

    from mosear_fast import MoSEConfig
    from tests.models import tiny_qwen2

    base_dir, adapter_dir = tmp_path / "qwen2", tmp_path / "adapter"
    tiny_qwen2(seed=3).save_pretrained(base_dir)
    torch.manual_seed(4)
    peft_model = get_peft_model(tiny_qwen2(seed=3), MoSEConfig(r=4, num_experts=3, top_k=1, init_weights=False,
                                                               target_modules=["q_proj", "v_proj", "o_proj"]))
    peft_model.save_pretrained(adapter_dir)
    (adapter_dir / "ar_config.json").write_text(json.dumps({"strength": 0.7, "balance": ["visual", "audio"]}))
    return base_dir, adapter_dir


@pytest.mark.slow
def test_qwen2_with_adapter_and_ar(qwen2_with_adapter, tmp_path):
    base_dir, adapter_dir = qwen2_with_adapter
    module, _ = load_source(base_dir, adapter=adapter_dir)
    assert module.model._mosear_context.ar is not None
    report = export(base_dir, tmp_path / "out", adapter=adapter_dir, batch="1:2:3", seq="2:9:17")
    assert report["validation"]["pass"], report["validation"]
    assert report["tensorrt_lint"]["buildable"]
    assert report["ops"]["TopK"] >= 1
    config = json.loads((tmp_path / "out" / "export_config.json").read_text())
    assert config["inputs"][0]["range"] == [0, 96]
