"""TensorRT lint (no TensorRT needed), shape ranges and profiles, output comparison: the pure parts."""

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from mosear_fast.export import tensorrt_lint
from mosear_fast.export.lint import resolve_version
from mosear_fast.export.shapes import odd_size, parse_range, tensorrt_profile, trace_size, validation_shapes
from mosear_fast.export.tensorrt_build import TensorRTUnavailable, missing_requirements, require_tensorrt
from mosear_fast.export.validate import Tolerance, compare_outputs


def _model(nodes, inputs, outputs, initializers=(), opset=20):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _reasons(problems):
    return " | ".join(p["reason"] for p in problems)


def test_clean_graph_has_no_problems(tmp_path):
    model = _model([helper.make_node("MatMul", ["a", "b"], ["c"], name="mm"),
                    helper.make_node("TopK", ["c", "k"], ["v", "i"], name="topk", sorted=1)],
                   [_vi("a", TensorProto.FLOAT, [2, 3]), _vi("b", TensorProto.FLOAT, [3, 4])],
                   [_vi("v", TensorProto.FLOAT, None), _vi("i", TensorProto.INT64, None)],
                   [helper.make_tensor("k", TensorProto.INT64, [1], [2])])
    path = tmp_path / "clean.onnx"
    onnx.save(model, str(path))
    assert tensorrt_lint(path) == []
    assert tensorrt_lint(model, "11") == []


@pytest.mark.parametrize("node, inputs, initializers, expected", [
    (helper.make_node("ScatterND", ["d", "idx", "u"], ["y"], name="planted", reduction="add"),
     [_vi("d", TensorProto.FLOAT, [4]), _vi("idx", TensorProto.INT64, [2, 1]), _vi("u", TensorProto.FLOAT, [2])],
     [], "reduction 'none' only"),
    (helper.make_node("NonZero", ["d"], ["y"], name="planted"), [_vi("d", TensorProto.INT64, [4])], [],
     "NonZero on INT64"),
    (helper.make_node("TopK", ["d", "k"], ["y", "yi"], name="planted", sorted=0),
     [_vi("d", TensorProto.FLOAT, [4])], [helper.make_tensor("k", TensorProto.INT64, [1], [2])], "sorted=1"),
    (helper.make_node("TopK", ["d", "k"], ["y", "yi"], name="planted"),
     [_vi("d", TensorProto.FLOAT, [5000])], [helper.make_tensor("k", TensorProto.INT64, [1], [4000])], "K < 3840"),
    (helper.make_node("TopK", ["d", "kin"], ["y", "yi"], name="planted"),
     [_vi("d", TensorProto.FLOAT, [8]), _vi("kin", TensorProto.INT64, [1])], [], "not a build-time constant"),
    (helper.make_node("Unique", ["d"], ["y"], name="planted"), [_vi("d", TensorProto.FLOAT, [4])], [],
     "not supported"),
    (helper.make_node("MoSEDispatch", ["d"], ["y"], name="planted", domain="mosear"),
     [_vi("d", TensorProto.FLOAT, [4])], [], "plugin"),
    (helper.make_node("ReduceSum", ["d", "axes"], ["y"], name="planted"),
     [_vi("d", TensorProto.FLOAT, [4]), _vi("axes", TensorProto.INT64, [1])], [], "build-time constant"),
    (helper.make_node("Clip", ["d"], ["y"], name="planted"), [_vi("d", TensorProto.INT64, [4])], [],
     "Clip on INT64"),
])
def test_planted_unsupported_nodes_are_listed(node, inputs, initializers, expected):
    model = _model([helper.make_node("Identity", [inputs[0].name], ["ok"], name="fine"), node], inputs,
                   [_vi("y", TensorProto.FLOAT, None)], initializers)
    problems = tensorrt_lint(model)
    assert [p["node"] for p in problems] == ["planted"], problems
    assert expected in _reasons(problems)


def test_opset_outside_the_version_range():
    model = _model([helper.make_node("Relu", ["a"], ["b"])], [_vi("a", TensorProto.FLOAT, [2])],
                   [_vi("b", TensorProto.FLOAT, [2])], opset=22)
    assert tensorrt_lint(model, "10.15") == []
    problems = tensorrt_lint(model, "10.0")
    assert problems and "outside TensorRT 10.0's range 9-20" in problems[0]["reason"]


def test_versions_resolve_to_the_table():
    assert resolve_version("10.8") == "10.0"
    assert resolve_version("10.15.1") == "10.15"
    assert resolve_version("11") == "11.0"
    with pytest.raises(ValueError, match="trt_version"):
        resolve_version("9.2")
    with pytest.raises(ValueError, match="trt_version"):
        resolve_version("ten")


def test_ranges_parse_and_fail_with_the_option_name():
    axis = parse_range("1:8:33", name="seq", option="--seq")
    assert (axis.min, axis.opt, axis.max) == (1, 8, 33)
    assert parse_range("5", name="batch", option="--batch").as_list() == [5, 5, 5]
    for bad, message in [("8:4:2", "MIN <= MAX"), ("1:9:4", "OPT"), ("a:b:c", "MIN:OPT:MAX"), ("0:1:2", "MIN >= 1"),
                         ("1:2", "MIN:OPT:MAX")]:
        with pytest.raises(ValueError, match=message) as err:
            parse_range(bad, name="seq", option="--seq")
        assert str(err.value).startswith("--seq:")


def test_validation_shapes_profiles_and_trace_sizes():
    batch, seq = parse_range("1:2:4", name="batch", option="--batch"), parse_range("1:32:128", name="seq",
                                                                                    option="--seq")
    shapes = validation_shapes(batch, seq)
    assert [s[0] for s in shapes] == ["min", "opt", "max", "odd"]
    assert shapes[0][1:] == (1, 1) and shapes[2][1:] == (4, 128)
    assert odd_size(seq) % 2 == 1 and 1 < odd_size(seq) < 128
    assert trace_size(batch) == 2 and trace_size(parse_range("1:1:4", name="b", option="--batch")) == 2
    assert trace_size(parse_range("3", name="b", option="--batch")) == 3
    profile = tensorrt_profile(["input_ids", "attention_mask"], batch, seq)
    assert profile["input_ids"] == ((1, 1), (2, 32), (4, 128)) == profile["attention_mask"]


def test_tensorrt_missing_is_named():
    missing = missing_requirements()
    if not missing:
        pytest.skip("tensorrt and a GPU are present")
    with pytest.raises(TensorRTUnavailable, match="needs") as err:
        require_tensorrt()
    assert ("tensorrt" in str(err.value)) or ("CUDA GPU" in str(err.value))


def test_compare_outputs_fails_hard_on_names_shapes_and_nan():
    tol = Tolerance(rtol=1e-5, atol=None)
    ref = torch.randn(2, 3, 4)
    assert compare_outputs({"logits": ref.numpy()}, {"logits": ref}, tol)["logits"]["pass"]
    renamed = compare_outputs({"out": ref.numpy()}, {"logits": ref}, tol)
    assert renamed["logits"]["hard_fail"] and renamed["out"]["hard_fail"]
    reshaped = compare_outputs({"logits": ref.reshape(6, 4).numpy()}, {"logits": ref}, tol)["logits"]
    assert reshaped["hard_fail"] and "shape" in reshaped["reason"]
    nan = ref.clone()
    nan[0, 0, 0] = float("nan")
    assert compare_outputs({"logits": nan.numpy()}, {"logits": ref}, tol)["logits"]["hard_fail"]
    off = compare_outputs({"logits": (ref * 1.01).numpy()}, {"logits": ref}, tol)["logits"]
    assert not off["pass"] and not off["hard_fail"]
    assert off["max_abs_diff"] > 0 and off["max_rel_diff"] == pytest.approx(0.01, rel=1e-3)
