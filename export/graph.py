"""The ONNX graph: torch.onnx.export (dynamo) of the ExportModule, its dynamic axes and dtype.

Every input's shape comes from the module's ``input_specs``: the axes named "batch" and "seq" are
dynamic over their ranges (``--batch``, ``--seq``), integer sizes are fixed (the audio-visual model's
placeholder counts and feature widths).

While the tracer runs, ``mose_lora`` and ``ar_attention`` switch to their static-shape forms
(``mosear_fast.backend``), so the graph holds TopK, one-hot gates and stacked MatMuls for MoSE and
MatMul/Exp/ReduceMax/Where for AR: no NonZero, no ScatterND with a reduction, no data-dependent
shape. Low-precision graphs keep the router's softmax and TopK in float32 (the module computes
them in float32), which TensorRT's strongly typed networks and onnxruntime's CPU TopK both need.
Integer clamps and cumulative sums (the modules' id clamps; the audio-visual model's placeholder
ranks and positions) are rewritten before translation (``STATIC_DECOMPOSITIONS``), as TensorRT parses
Clip and CumSum for float inputs only.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import warnings
from pathlib import Path

import onnx
import torch

from .shapes import AxisRange, trace_size
from .sources import ExportModule, InputSpec, example_inputs, input_specs
from .support import check_exportable

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_OPSET = 20
OPSET_RANGE = (18, 24)  # torch's exporter writes opset 18+; TensorRT 10/11 parse up to 24
OUTPUT_NAMES = ["logits"]  # of a prefill graph; ExportModule.output_names() in general
# Beyond this many bytes of weights, they go to model.onnx.data (protobuf caps a file at 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


def _isin_by_compare(elements, test_elements, *, assume_unique=False, invert=False):
    """``isin`` as one broadcast compare: the exporter's own decomposition sorts and calls searchsorted
    (no ONNX translation) when sizes are symbolic; the test set here is a handful of modality ids."""
    found = (elements.unsqueeze(-1) == test_elements.reshape(-1)).any(-1)
    return ~found if invert else found


def _bound(x, value):
    return torch.full((), value, dtype=x.dtype, device=x.device)


def _clamp_by_max_min(x, min=None, max=None):  # noqa: A002  (aten's argument names)
    """``clamp`` as Max/Min (float) or Where (integer): the exporter writes Clip, which TensorRT parses for
    float inputs only, and the modules clamp integer ids (``modality.clamp_min(0)``, the audio-visual
    model's placeholder ranks). Integer bounds go through Where because the graph optimiser fuses a
    Max/Min pair back into Clip. Max/Min propagate NaN as clamp does."""
    integer = not (x.dtype.is_floating_point or x.dtype.is_complex)
    if min is not None:
        x = torch.where(x < min, _bound(x, min), x) if integer else torch.maximum(x, _bound(x, min))
    if max is not None:
        x = torch.where(x > max, _bound(x, max), x) if integer else torch.minimum(x, _bound(x, max))
    return x


def _integer_cumsum_in_float(x, dim, dtype=None):
    """An integer or bool ``cumsum`` computed in float32 and cast back: TensorRT's CumSum takes float
    inputs only. Exact while the partial sums stay below 2**24 in magnitude, as the modules' sums do:
    they count tokens (placeholder ranks, positions from the attention mask). Float cumsum is kept."""
    if x.dtype.is_floating_point or x.dtype.is_complex:
        return NotImplemented  # not decomposed: the exporter's own CumSum
    out_dtype = dtype if dtype is not None else (torch.int64 if x.dtype in (torch.bool, torch.int8, torch.uint8,
                                                                            torch.int16, torch.int32) else x.dtype)
    return x.to(torch.float32).cumsum(dim).to(out_dtype)


# Applied to the traced program before ONNX translation (only these ops; the exporter decomposes the rest).
STATIC_DECOMPOSITIONS = {
    torch.ops.aten.isin.Tensor_Tensor: _isin_by_compare,
    torch.ops.aten.clamp.default: _clamp_by_max_min,
    torch.ops.aten.clamp_min.default: lambda x, min: _clamp_by_max_min(x, min=min),
    torch.ops.aten.clamp_max.default: lambda x, max: _clamp_by_max_min(x, max=max),
    torch.ops.aten.cumsum.default: _integer_cumsum_in_float,
}


class GraphExportError(RuntimeError):
    """torch.onnx.export failed, or the graph lost a dynamic axis."""


def check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise ValueError(f"--opset: expected an int in [{OPSET_RANGE[0]}, {OPSET_RANGE[1]}], got {opset!r}")
    return opset


def cast_module(module: ExportModule, dtype_name: str) -> ExportModule:
    """The module with its floating-point weights in ``dtype_name`` (fp32, fp16 or bf16)."""
    if dtype_name not in DTYPES:
        raise ValueError(f"--dtype: expected one of {tuple(DTYPES)}, got {dtype_name!r}")
    return module.to(DTYPES[dtype_name])


def _dim(axis: AxisRange):
    return None if axis.min == axis.max else torch.export.Dim(axis.name, min=axis.min, max=axis.max)


def _ranges(batch: AxisRange, seq: AxisRange, past: AxisRange | None) -> dict[str, AxisRange]:
    return {axis.name: axis for axis in (batch, seq, past) if axis is not None}


def _dynamic_shapes(module: ExportModule, specs: list[InputSpec], ranges: dict[str, AxisRange]):
    """torch.export's dynamic_shapes for the module's inputs: named Dims for the ranges; an axis that is a
    sum of ranges (the with-past attention mask, "past_seq + seq") is left for the tracer to derive."""
    dims = {name: _dim(axis) for name, axis in ranges.items()}
    per_input = []
    for spec in specs:
        entry = {}
        for i, a in enumerate(spec.shape):
            if isinstance(a, str) and a in dims and dims[a] is not None:
                entry[i] = dims[a]
            elif isinstance(a, str) and "+" in a:
                entry[i] = torch.export.Dim.AUTO
        per_input.append(entry)
    params = inspect.signature(module.forward).parameters.values()
    var_positional = [p.name for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL]
    if var_positional:  # forward(*inputs): one tuple of per-input shapes
        return {var_positional[0]: tuple(per_input)}
    return {spec.name: entry for spec, entry in zip(specs, per_input)}


def export_onnx(module: ExportModule, path: Path, *, batch: AxisRange, seq: AxisRange, opset: int,
                past: AxisRange | None = None) -> onnx.ModelProto:
    """Writes the graph to ``path`` (weights beside it in ``path.name + '.data'`` when large); returns it
    loaded without the external weights. ``past``: the cache length range of a with-past decoder."""
    extra = {} if past is None else {"past": trace_size(past)}
    args = example_inputs(module, trace_size(batch), trace_size(seq), seed=1, **extra)
    specs = input_specs(module)
    names = [spec.name for spec in specs]
    ranges = _ranges(batch, seq, past)
    log = io.StringIO()
    try:
        check_exportable(module.model)
        with torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(log), _quiet_exporter_logs():
            warnings.simplefilter("ignore")
            exported = torch.export.export(module, args, dynamic_shapes=_dynamic_shapes(module, specs, ranges),
                                           strict=False)
            exported = exported.run_decompositions(STATIC_DECOMPOSITIONS)
            program = torch.onnx.export(exported, args, dynamo=True, input_names=names,
                                        output_names=module.output_names(), opset_version=opset, optimize=True,
                                        verbose=False)
    except (torch.onnx.errors.OnnxExporterError, RuntimeError, ValueError) as err:
        raise GraphExportError(f"torch.onnx.export failed: {_first_line(err)}") from err
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    model = onnx.load(str(path), load_external_data=False)
    _check_dynamic_axes(model, specs, ranges)
    _name_dynamic_axes(model, specs, ranges)
    onnx.save(model, str(path))  # external weights, if any, stay where program.save put them
    return model


def _dynamic_positions(specs: list[InputSpec], ranges: dict[str, AxisRange]):
    """(input name, axis index, axis name) of every input axis that is dynamic: named after a range that is
    not one size, or a sum of ranges ("past_seq + seq")."""
    dynamic = {name for name, axis in ranges.items() if axis.min != axis.max}
    return [(spec.name, i, a) for spec in specs for i, a in enumerate(spec.shape)
            if isinstance(a, str) and (a in dynamic or "+" in a)]


_SYMBOL = re.compile(r"\b[su]\d+\b")


def _name_dynamic_axes(model: onnx.ModelProto, specs: list[InputSpec], ranges: dict[str, AxisRange]) -> None:
    """Renames the tracer's symbols (s27, s53, ...) to the axis names ("batch", "seq", "past_seq")
    everywhere, expressions included ("s15 + s70" -> "past_seq + seq", terms in the ranges' order)."""
    inputs = {v.name: v.type.tensor_type.shape.dim for v in model.graph.input}
    rename = {}
    for name, i, axis in _dynamic_positions(specs, ranges):
        symbol = inputs[name][i].dim_param
        if symbol and _SYMBOL.fullmatch(symbol) and "+" not in axis:
            rename[symbol] = axis
    order = sorted(ranges, key=lambda name: name != "past_seq")  # "past_seq + seq": cache first

    def renamed(text: str) -> str:
        text = _SYMBOL.sub(lambda m: rename.get(m.group(0), m.group(0)), text)
        terms = [t.strip() for t in text.split("+")]
        if len(terms) > 1 and all(t in order for t in terms):
            text = " + ".join(sorted(terms, key=order.index))
        return text

    for info in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if info.type.HasField("tensor_type"):
            for dim in info.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = renamed(dim.dim_param)


def _check_dynamic_axes(model: onnx.ModelProto, specs: list[InputSpec], ranges: dict[str, AxisRange]) -> None:
    """Every dynamic input axis keeps a symbolic dim (a specialised axis would make every other size fail
    at run time); every input is in the graph."""
    inputs = {v.name: v.type.tensor_type.shape.dim for v in model.graph.input}
    missing = [spec.name for spec in specs if spec.name not in inputs]
    if missing:
        raise GraphExportError(f"the exported graph has no input {missing[0]!r} (inputs: {sorted(inputs)}); the "
                               "model does not use it")
    for name, i, axis in _dynamic_positions(specs, ranges):
        dim = inputs[name][i]
        if not dim.dim_param:
            raise GraphExportError(f"the exported graph fixed {name} axis {i} ({axis}) to {dim.dim_value}; "
                                   "the model specialises that size while tracing")


@contextlib.contextmanager
def _quiet_exporter_logs():
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    cause = err.__cause__
    while cause is not None:  # the exporter wraps the real reason
        text = str(cause).strip() or text
        cause = cause.__cause__
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:400]
    return type(err).__name__


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type (with its domain when not the default one), subgraphs included."""
    counts: dict[str, int] = {}
    for node in iter_nodes(model.graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def iter_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_nodes(sub)
