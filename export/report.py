"""The two JSON files of an export: ``export_config.json`` (the graph's interface) and ``report.json``
(what was checked and measured)."""

from __future__ import annotations

import importlib.metadata

import onnx
from onnx import TensorProto

from .shapes import AxisRange
from .sources import InputSpec


def _dtype_name(elem_type: int) -> str:
    return {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
            TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.BOOL: "bool"}.get(
        elem_type, TensorProto.DataType.Name(elem_type).lower())


def _shape(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def export_config(model: onnx.ModelProto, specs: list[InputSpec], *, batch: AxisRange, seq: AxisRange,
                  dtype: str, opset: int, files: list[str], interface: dict | None = None,
                  past: AxisRange | None = None, ops: str = "static") -> dict:
    """Every input and output: name, dtype, shape with named dynamic axes (as the graph has them);
    integer inputs' valid values [low, high); a note on each input where the source gives one; and
    ``interface``, what else a deployer must know (the source's ``ExportModule.interface``)."""
    by_name = {spec.name: spec for spec in specs}
    inputs = []
    for value in model.graph.input:
        entry = {"name": value.name, "dtype": _dtype_name(value.type.tensor_type.elem_type), "shape": _shape(value)}
        spec = by_name.get(value.name)
        if spec is not None and spec.low is not None:
            entry["range"] = [spec.low, spec.high]
            entry["range_note"] = "valid values are [low, high)"
        if spec is not None and spec.note:
            entry["note"] = spec.note
        inputs.append(entry)
    outputs = [{"name": v.name, "dtype": _dtype_name(v.type.tensor_type.elem_type), "shape": _shape(v)}
               for v in model.graph.output]
    axes = [axis for axis in (batch, seq, past) if axis is not None]
    return {"format": "onnx", "opset": opset, "dtype": dtype, "ops": ops,
            "dynamic_axes": {axis.name: {"min": axis.min, "opt": axis.opt, "max": axis.max} for axis in axes
                             if axis.min != axis.max},
            "dynamic_axes_note": "the graph's valid sizes: min and max inclusive",
            "inputs": inputs, "outputs": outputs, "interface": dict(interface or {}), "files": files}


def library_versions() -> dict:
    versions = {}
    for name in ("mosear-fast", "torch", "onnx", "onnxscript", "onnxruntime", "transformers", "peft", "tensorrt"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


NOT_VALIDATED = "not validated"


def validation_summary(shapes: list[dict]) -> dict:
    """Whether any check failed hard (always fatal) or only on tolerance (fatal with --strict), and the
    status: "passed", "failed", or "not validated" (the runtime here cannot run the graph at all)."""
    outputs = [o for entry in shapes for o in entry["outputs"].values()]
    not_run = bool(outputs) and all(o.get("not_run") for o in outputs)
    passed = all(o["pass"] for o in outputs)
    return {"pass": passed, "hard_fail": any(o.get("hard_fail") for o in outputs),
            "status": NOT_VALIDATED if not_run else ("passed" if passed else "failed")}


def failure_lines(shapes: list[dict]) -> list[str]:
    lines = []
    for entry in shapes:
        for name, o in entry["outputs"].items():
            if not o["pass"]:
                detail = o.get("reason") or f"relative error {o['rel_error']:.2e}, max abs diff {o['max_abs_diff']:.2e}"
                lines.append(f"{name} at {entry['shape']} shape ({entry['batch']}, {entry['seq']}): {detail}")
    return lines
