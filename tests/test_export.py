"""mosear-export end to end: the demo's audio-visual model (with the demo's MoSE adapters and AR), a
mosear-train output folder, and a tiny Qwen2 with a saved MoSE adapter and AR; onnxruntime parity on
several shapes (batch 1, odd text lengths, left padding), fp16, the output folder, and no partial
output on failure."""

import json

import onnx
import pytest
import torch

from mosear_fast import av_model as av
from mosear_fast.export import build_demo_model, export, load_source
from mosear_fast.export import pipeline as pipeline_module
from mosear_fast.export.sources import AudioVisualExport, CausalLMExport, example_inputs, input_specs
from mosear_fast.export.validate import ort_session

AV_INPUTS = ["input_ids", "visual", "audio", "attention_mask"]
DEMO_RANGES = dict(batch="1:2:3", seq="34:40:57")  # the demo prompt: 32 visual + 1 audio placeholders + text
TINY_SIZES = {"n_visual": 4, "n_audio": 2, "hidden": 32, "intermediate": 64, "layers": 1}


def _rel_err(actual, expected):
    return float((torch.from_numpy(actual) - expected).norm() / expected.norm())


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "demo"
    report = export("demo", out, **DEMO_RANGES)
    return out, report


def test_demo_export_files_and_config(demo_export):
    out, report = demo_export
    assert sorted(p.name for p in out.iterdir()) == ["export_config.json", "model.onnx", "report.json"]
    assert report["files"] == ["export_config.json", "model.onnx", "report.json"]
    config = json.loads((out / "export_config.json").read_text())
    inputs = {i["name"]: i for i in config["inputs"]}
    assert [i["name"] for i in config["inputs"]] == AV_INPUTS
    assert inputs["input_ids"]["dtype"] == "int64" and inputs["input_ids"]["shape"] == ["batch", "seq"]
    assert inputs["input_ids"]["range"] == [0, av.VOCAB_SIZE]
    assert "32 visual placeholders" in inputs["input_ids"]["note"]
    assert inputs["visual"]["dtype"] == "float32" and inputs["visual"]["shape"] == ["batch", 32, 64]
    assert inputs["audio"]["dtype"] == "float32" and inputs["audio"]["shape"] == ["batch", 1, 64]
    assert "range" not in inputs["visual"]
    assert inputs["attention_mask"] == {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"],
                                        "range": [0, 2], "range_note": "valid values are [low, high)",
                                        "note": "1 = real token, 0 = left padding"}
    assert config["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", av.VOCAB_SIZE]}]
    assert config["dynamic_axes"] == {"batch": {"min": 1, "opt": 2, "max": 3},
                                      "seq": {"min": 34, "opt": 40, "max": 57}}
    interface = config["interface"]
    assert "derived in the graph" in interface["modality_ids"] and interface["mose"] and interface["ar"]
    prompt = interface["prompt"]
    assert (prompt["visual_token_id"], prompt["audio_token_id"], prompt["n_visual"], prompt["n_audio"]) == (3, 4, 32, 1)
    assert "seq_valid" not in prompt and "dynamic_axes.seq" in prompt["seq_note"]  # one valid length range
    assert len(prompt["standard_prompt_ids"]) == 40
    assert json.loads((out / "report.json").read_text())["validation"]["pass"] == report["validation"]["pass"]


def test_demo_export_report(demo_export):
    _, report = demo_export
    validation = report["validation"]
    assert validation["pass"] and not validation["hard_fail"]
    shapes = {(s["batch"], s["seq"]) for s in validation["shapes"]}
    assert (1, 34) in shapes and (3, 57) in shapes and any(t % 2 == 1 and t not in (57,) for _, t in shapes)
    for entry in validation["shapes"]:
        logits = entry["outputs"]["logits"]
        assert logits["rel_error"] <= 1e-5 and logits["max_abs_diff"] >= 0 and "max_rel_diff" in logits
    assert report["tensorrt_lint"] == {"version": "10.15", "buildable": True, "problems": []}
    ops = report["op_counts"]
    assert {"NonZero", "ScatterND", "Loop", "If"}.isdisjoint(ops) and ops["TopK"] >= 1 and report["ops"] == "static"
    latency = report["latency"]
    assert latency["pytorch_ms"] > 0 and latency["onnxruntime_ms"] > 0
    assert latency["onnxruntime_provider"] == "CPUExecutionProvider"


def test_demo_graph_runs_other_shapes_like_the_module(demo_export):
    out, _ = demo_export
    module, example = load_source("demo")
    assert isinstance(module, AudioVisualExport) and [tuple(t.shape) for t in example] == [
        (2, 40), (2, 32, 64), (2, 1, 64), (2, 40)]
    session = ort_session(out / "model.onnx")
    assert [i.name for i in session.get_inputs()] == AV_INPUTS
    for batch, length in [(1, 35), (3, 34), (2, 51), (1, 57)]:  # batch 1, odd text lengths, padding
        inputs = example_inputs(module, batch, length, seed=9)
        with torch.no_grad():
            expected = module(*inputs)
        actual = session.run(None, dict(zip(AV_INPUTS, (t.numpy() for t in inputs))))[0]
        assert actual.shape == (batch, length, av.VOCAB_SIZE)
        assert _rel_err(actual, expected) < 1e-5


def test_example_inputs_have_a_valid_placeholder_layout():
    module, _ = load_source("demo")
    ids, visual, audio, mask = example_inputs(module, 4, 45, seed=3)
    assert ids.dtype == mask.dtype == torch.int64 and visual.dtype == audio.dtype == torch.float32
    assert visual.shape == (4, 32, 64) and audio.shape == (4, 1, 64)
    assert bool(mask[0].all()) and not bool(mask.all())  # row 0 fills the length; others are left padded
    for row_ids, row_mask in zip(ids, mask):
        real = row_ids[row_mask.bool()]
        assert int((real == av.VISUAL_ID).sum()) == 32 and int((real == av.AUDIO_ID).sum()) == 1
        assert bool((row_ids[~row_mask.bool()] == av.PAD_ID).all())
        assert torch.equal(row_mask, row_mask.sort().values)  # padding only on the left
    with pytest.raises(ValueError, match="at least 33 tokens"):
        example_inputs(module, 1, 32)


def test_demo_model_is_the_demos_configuration_deterministic_and_adapters_matter():
    from mosear_fast.mose_layer import MoSELinear
    from mosear_fast.training.demo import DEFAULT

    first, second = build_demo_model(), build_demo_model()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert isinstance(first, av.AudioVisualLM)
    assert (first.sizes.n_visual, first.sizes.hidden, first.sizes.intermediate) == (
        DEFAULT.n_visual, DEFAULT.hidden, 2 * DEFAULT.hidden)
    adapted = {name.rsplit(".", 1)[-1]: m for name, m in first.named_modules() if isinstance(m, MoSELinear)}
    assert set(adapted) == set(DEFAULT.mose_targets)
    adapter = next(iter(adapted.values())).active_mose_adapter()
    assert (adapter.rank, adapter.num_experts) == (DEFAULT.mose_rank, DEFAULT.mose_experts)
    assert first.llm._mosear_context.ar["strength"] == DEFAULT.ar_strength

    module = AudioVisualExport(first)
    backbone, _ = av.build_demo_model(0, n_visual=DEFAULT.n_visual, hidden=DEFAULT.hidden,
                                      intermediate=2 * DEFAULT.hidden)
    inputs = example_inputs(module, 2, 40)
    with torch.no_grad():
        prepared, plain = module(*inputs), AudioVisualExport(backbone)(*inputs)
    assert not torch.allclose(prepared, plain, atol=1e-4)  # the adapters and AR change the output


def test_existing_output_needs_overwrite_and_failure_leaves_it_intact(demo_export, tmp_path, monkeypatch):
    out = tmp_path / "again"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="--overwrite"):
        export("demo", out, **DEMO_RANGES)

    def half_written_graph(module, path, **kwargs):
        path.write_bytes(b"partial graph")  # the failure strikes after a file is written
        raise RuntimeError("forced failure")

    monkeypatch.setattr(pipeline_module.graph, "export_onnx", half_written_graph)
    with pytest.raises(RuntimeError, match="forced failure"):
        export("demo", out, overwrite=True, **DEMO_RANGES)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no staging folder left behind
    with pytest.raises(RuntimeError, match="forced failure"):
        export("demo", tmp_path / "fresh", **DEMO_RANGES)
    assert not (tmp_path / "fresh").exists()


def test_seq_range_must_hold_the_placeholders(tmp_path):
    with pytest.raises(ValueError, match=r"--seq: this model needs seq >= 33 \(32 visual \+ 1 audio"):
        export("demo", tmp_path / "out", batch="1:1:2", seq="8:16:32")
    assert not (tmp_path / "out").exists()


def write_trained_folder(folder, *, seed=5, sizes=TINY_SIZES, ar_strength=0.7):
    """A mosear-train output folder written by training's writer, as after training: a backbone with its
    weights file, MoSE with B non-zero and non-unit dynamic modality weights, and an AR config."""
    from mosear_fast import ARConfig, MoSEConfig, apply_mosear
    from mosear_fast.atomic import atomic_write_json
    from mosear_fast.training.adapter_state import ADAPTER_FILE, mose_adapters, save_adapter
    from mosear_fast.training.trained_folder import backbone_reference, folder_files, write_backbone_weights

    backbone, _ = av.build_demo_model(seed, **sizes)
    weights = write_backbone_weights(folder, backbone)
    mose = MoSEConfig(r=4, num_experts=3, top_k=2, init_weights=False, target_modules=["q_proj", "v_proj", "o_proj"])
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        apply_mosear(backbone.llm, mose=mose)
        for adapter in mose_adapters(backbone):
            adapter.modality_weight.uniform_(0.5, 2.0)
    save_adapter(folder / ADAPTER_FILE, backbone)
    for name, content in folder_files(mose, ARConfig(strength=ar_strength),
                                      backbone_reference(seed, sizes, weights)).items():
        atomic_write_json(folder / name, content)
    return folder


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    return write_trained_folder(tmp_path_factory.mktemp("trained") / "run")


def test_trained_folder_loads_as_load_trained_does(trained_folder):
    from mosear_fast.trained import load_trained

    module, example = load_source(trained_folder)
    assert isinstance(module, AudioVisualExport) and module.model.llm._mosear_context.ar is not None
    assert [s.shape for s in input_specs(module)] == [("batch", "seq"), ("batch", 4, 64), ("batch", 2, 64),
                                                      ("batch", "seq")]
    assert module.default_seq() == "7:13:128"  # 4 + 2 placeholders + 1 text token; the standard prompt
    reference = load_trained(trained_folder)
    ids, visual, audio, mask = example
    with torch.no_grad():
        expected = reference(ids, visual, audio, attention_mask=mask).logits
        assert torch.equal(module(*example), expected)
    assert module.model.llm._mosear_context.ar["strength"] == 0.7  # the folder's AR config is applied
    assert load_trained(trained_folder, ar=False).llm._mosear_context.ar is None


@pytest.mark.slow
def test_trained_folder_fp16_export(trained_folder, tmp_path):
    report = export(trained_folder, tmp_path / "fp16", dtype="fp16", batch="1:2:2", seq="6:11:15")
    assert report["validation"]["pass"], report["validation"]
    assert report["validation"]["tolerance"]["rel_error_max"] == 5e-3
    assert report["validation"]["reference"] == "float32 PyTorch module"  # not the drifting fp16 module
    assert report["tensorrt_lint"]["buildable"], report["tensorrt_lint"]
    model = onnx.load(str(tmp_path / "fp16" / "model.onnx"), load_external_data=False)
    inputs = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    assert inputs["visual"] == inputs["audio"] == onnx.TensorProto.FLOAT  # features stay float32 inputs
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    # router softmax and TopK stay in float32 in the low-precision graph
    values = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    topk_inputs = [n.input[0] for n in model.graph.node if n.op_type == "TopK"]
    assert topk_inputs and all(values.get(name) == onnx.TensorProto.FLOAT for name in topk_inputs)


@pytest.fixture
def qwen2_with_adapter(tmp_path):
    from tests.models import save_qwen2_with_adapter

    return save_qwen2_with_adapter(tmp_path)


@pytest.mark.slow
def test_qwen2_with_adapter_and_ar(qwen2_with_adapter, tmp_path):
    base_dir, adapter_dir = qwen2_with_adapter
    module, example = load_source(base_dir, adapter=adapter_dir)
    assert isinstance(module, CausalLMExport) and len(example) == 3
    assert module.model._mosear_context.ar is not None
    report = export(base_dir, tmp_path / "out", adapter=adapter_dir, batch="1:2:3", seq="2:9:17")
    assert report["validation"]["pass"], report["validation"]
    assert report["tensorrt_lint"]["buildable"]
    assert report["op_counts"]["TopK"] >= 1
    config = json.loads((tmp_path / "out" / "export_config.json").read_text())
    assert [i["name"] for i in config["inputs"]] == ["input_ids", "attention_mask", "modality_ids"]
    assert all(i["shape"] == ["batch", "seq"] and i["dtype"] == "int64" for i in config["inputs"])
    assert config["inputs"][0]["range"] == [0, 96] and config["inputs"][2]["range"] == [-1, 3]
