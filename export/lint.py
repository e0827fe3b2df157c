"""TensorRT lint without TensorRT: every node of an ONNX graph against the parser's operator table
(``trt_operators.py``) for a target version, with the restrictions that make a parse fail.

``tensorrt_lint(onnx_path, trt_version=None) -> list of problems`` (empty when the graph can build).
Each problem is a dict: ``node`` (name), ``op_type``, ``reason``. Checked: the default-domain opset
against the version's range; unknown and unsupported ops; custom-domain ops (plugins, found by
op_type only); the first input's type; ScatterND/ScatterElements reductions; TopK ``sorted`` and
``K < 3840``; inputs that must be build-time constants (reduction axes, Squeeze/Unsqueeze axes, ...).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx.numpy_helper
from onnx import TensorProto

from . import trt_operators as table
from .graph import iter_nodes

_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE", TensorProto.FLOAT8E4M3FN: "FP8",
}


def resolve_version(trt_version: str | None) -> str:
    """The table entry for ``trt_version`` ("10.8", "11", ...): the newest known entry not newer than it;
    None means the installed tensorrt's version, else the default."""
    if trt_version is None:
        try:
            import tensorrt

            trt_version = tensorrt.__version__
        except ImportError:
            return table.DEFAULT_VERSION
    try:
        wanted = tuple(int(p) for p in str(trt_version).split(".")[:2])
    except ValueError:
        raise ValueError(f"trt_version: expected a version like '10.15' or '11', got {trt_version!r}") from None
    known = sorted(table.OPSET_RANGE, key=lambda v: tuple(int(p) for p in v.split(".")))
    older = [v for v in known if tuple(int(p) for p in v.split(".")) <= wanted + (0,) * (2 - len(wanted))]
    if not older:
        raise ValueError(f"trt_version: TensorRT {trt_version} is older than the oldest version in the table "
                         f"({known[0]}); the lint covers TensorRT {', '.join(known)}")
    return older[-1]


def tensorrt_lint(onnx_path, trt_version: str | None = None, *, plugins=()) -> list[dict]:
    """Problems that would stop TensorRT's ONNX parser from building ``onnx_path`` (a path or ModelProto).
    ``plugins``: op_types of custom-domain nodes a plugin is registered for (``mosear-export --ops fused``
    registers ``trt_plugins``); other custom ops are reported."""
    version = resolve_version(trt_version)
    model = onnx_path if isinstance(onnx_path, onnx.ModelProto) else onnx.load(str(Path(onnx_path)),
                                                                                load_external_data=False)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001  (types stay unknown; the op checks still run)
        pass
    problems = _check_opset(model, version)
    types = _value_types(model)
    constants = _constant_names(model)
    for index, node in enumerate(iter_nodes(model.graph)):
        name = node.name or f"#{index}"
        if node.domain not in ("", "ai.onnx") and node.op_type in plugins:
            continue
        for reason in _node_problems(node, types, constants, model):
            problems.append({"node": name, "op_type": node.op_type, "reason": reason})
    return problems


def _check_opset(model, version):
    low, high = table.OPSET_RANGE[version]
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and not low <= entry.version <= high:
            return [{"node": "<model>", "op_type": "opset",
                     "reason": f"opset {entry.version} is outside TensorRT {version}'s range {low}-{high}"}]
    return []


def _value_types(model) -> dict[str, int]:
    types = {}
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    for node in iter_nodes(model.graph):
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _constant_names(model) -> dict[str, onnx.TensorProto | None]:
    """Names of build-time constants: initializers and Constant outputs (with their value when known)."""
    constants = {init.name: init for init in model.graph.initializer}
    for node in iter_nodes(model.graph):
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            constants[node.output[0]] = value
    return constants


def _attribute(node, name, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _node_problems(node, types, constants, model):
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        yield (f"custom op {node.domain}::{op}: TensorRT needs a plugin registered under the op_type {op!r} "
               "(the domain is ignored)")
        return
    if op in table.NOT_SUPPORTED:
        yield f"{op} is not supported by TensorRT's ONNX parser"
        return
    if op not in table.SUPPORTED_TYPES:
        yield f"{op} is not in TensorRT's ONNX operator table"
        return
    accepted = table.SUPPORTED_TYPES[op].split()
    if node.input and node.input[0] in types:
        type_name = _TYPE_NAMES.get(types[node.input[0]], TensorProto.DataType.Name(types[node.input[0]]))
        if type_name != "DOUBLE" and type_name not in accepted:
            yield f"{op} on {type_name} input; TensorRT accepts {', '.join(accepted)}"
    if op in ("ScatterND", "ScatterElements") and _attribute(node, "reduction", b"none") not in (b"none", "none"):
        reduction = _attribute(node, "reduction")
        reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
        if op == "ScatterND":
            yield f"ScatterND with reduction={reduction!r}: TensorRT supports reduction 'none' only"
    if op == "TopK":
        if _attribute(node, "sorted", 1) != 1:
            yield "TopK with sorted=0: TensorRT needs sorted=1"
        k_name = node.input[1] if len(node.input) > 1 else None
        k_value = _constant_int(constants.get(k_name)) if k_name in constants else None
        if k_name is not None and k_name not in constants:
            yield f"TopK K ({k_name}) is not a build-time constant: cannot check K < {table.TOPK_MAX_K}"
        elif k_value is not None and k_value >= table.TOPK_MAX_K:
            yield f"TopK with K={k_value}: TensorRT needs K < {table.TOPK_MAX_K}"
    if op in table.CONSTANT_INPUTS:
        position, what = table.CONSTANT_INPUTS[op]
        if len(node.input) > position and node.input[position] and node.input[position] not in constants:
            yield f"{op} `{what}` ({node.input[position]}) must be a build-time constant"


def _constant_int(tensor) -> int | None:
    if tensor is None:
        return None
    values = onnx.numpy_helper.to_array(tensor).reshape(-1)
    return int(values[0]) if values.size else None
