"""``export(source, out_dir, **options) -> report``: graph, checks, lint, optional engine, files.

Every option is checked before any work (``--seq`` against the source's limits right after it is
loaded, before anything is written); the output is staged in a temporary folder and moved into place
only when everything that must pass has passed (``files.staged_output``).
"""

from __future__ import annotations

from pathlib import Path

from . import graph, lint, shapes, tensorrt_build, validate
from .files import check_output_dir, staged_output, write_json
from .report import export_config, failure_lines, library_versions, validation_summary
from .sources import ExportModule, input_specs, load_source

FORMATS = ("onnx", "tensorrt", "both")
ONNX_FILE, CONFIG_FILE, REPORT_FILE = "model.onnx", "export_config.json", "report.json"
PLAN_FILE, CACHE_FILE = "model.plan", "timing.cache"


class ExportFailed(RuntimeError):
    """Validation failed (always for a shape/name mismatch or a run failure; for tolerance with strict)."""


def _check_options(format, dtype, opset, batch, seq, atol, rtol):
    if format not in FORMATS:
        raise ValueError(f"--format: expected one of {FORMATS}, got {format!r}")
    if dtype not in graph.DTYPES:
        raise ValueError(f"--dtype: expected one of {tuple(graph.DTYPES)}, got {dtype!r}")
    graph.check_opset(opset)
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
    return (shapes.parse_range(batch, name="batch", option="--batch"),
            None if seq is None else shapes.parse_range(seq, name="seq", option="--seq"))


def _seq_range(module: ExportModule, seq_range):
    """The --seq range (the source's default when not given), checked against what the model serves."""
    low, high, why = module.seq_limits()
    if seq_range is None:
        return shapes.parse_range(module.default_seq(), name="seq", option="--seq")
    return shapes.check_within(seq_range, low, high, option="--seq", why=why)


def export(source, out_dir, *, format: str = "onnx", dtype: str = "fp32", opset: int = graph.DEFAULT_OPSET,
           batch: str = shapes.DEFAULT_BATCH, seq: str = shapes.DEFAULT_SEQ, atol: float | None = None,
           rtol: float | None = None, strict: bool = False, overwrite: bool = False, adapter=None,
           trt_version: str | None = None) -> dict:
    """Exports ``source`` (see ``sources.load_source``) into ``out_dir``; returns the report (also in
    ``out_dir/report.json``). ``seq`` None: the source's default range (``ExportModule.default_seq``).
    Raises ValueError for bad options, SourceError, GraphExportError, TensorRTUnavailable or
    ExportFailed; on any error ``out_dir`` is left untouched."""
    batch_range, seq_range = _check_options(format, dtype, opset, batch, seq, atol, rtol)
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    if format != "onnx":
        tensorrt_build.require_tensorrt()
    lint.resolve_version(trt_version)  # a bad version string fails before the work
    module, _ = load_source(source, adapter=adapter)
    seq_range = _seq_range(module, seq_range)
    module = graph.cast_module(module, dtype)
    specs = input_specs(module)
    input_names = [s.name for s in specs]
    tol = validate.default_tolerance(graph.DTYPES[dtype], rtol=rtol, atol=atol)
    previous_cache = out_dir / CACHE_FILE if (out_dir / CACHE_FILE).is_file() else None

    with staged_output(out_dir, overwrite=overwrite) as stage:
        onnx_path = stage / ONNX_FILE
        model = graph.export_onnx(module, onnx_path, batch=batch_range, seq=seq_range, opset=opset)
        validate.check_graph(onnx_path)
        problems = lint.tensorrt_lint(model, trt_version)
        validation_shapes = shapes.validation_shapes(batch_range, seq_range)
        try:
            session = validate.ort_session(onnx_path)
        except Exception as err:  # noqa: BLE001  (e.g. bf16 kernels missing on the CPU provider)
            session = None
            checks = validate.not_run(validation_shapes, graph.OUTPUT_NAMES,
                                      f"onnxruntime cannot load the graph: {str(err).strip()[:300]}")
        else:
            checks = validate.validate(module, onnx_path, validation_shapes, tol, input_names=input_names,
                                       output_names=graph.OUTPUT_NAMES, session=session)
        summary = validation_summary(checks)
        report = {
            "source": str(source) if not hasattr(source, "forward") else type(source).__name__,
            "format": format, "dtype": dtype, "opset": opset,
            "ranges": {"batch": batch_range.as_list(), "seq": seq_range.as_list()},
            "onnx_checker": "passed",
            "validation": {"tolerance": tol.as_dict(), "strict": strict, **summary, "shapes": checks},
            "ops": graph.op_counts(model),
            "tensorrt_lint": {"version": lint.resolve_version(trt_version), "buildable": not problems,
                              "problems": problems},
            "latency": validate.latency(module, session, batch_range.opt, seq_range.opt, input_names=input_names),
            "versions": library_versions(),
        }
        if summary["hard_fail"] or (strict and not summary["pass"]):
            raise ExportFailed("validation failed: " + "; ".join(failure_lines(checks)[:3]))
        if format != "onnx":
            report["tensorrt"] = _engine(module, stage, onnx_path, batch_range, seq_range, dtype, tol, specs,
                                         previous_cache)
            if strict and not report["tensorrt"]["validation"]["pass"]:
                raise ExportFailed("TensorRT validation failed: "
                                   + "; ".join(failure_lines(report["tensorrt"]["validation"]["shapes"])[:3]))
        files = sorted(p.name for p in stage.iterdir()) + [CONFIG_FILE, REPORT_FILE]
        report["files"] = sorted(files)
        write_json(stage / CONFIG_FILE, export_config(model, specs, batch=batch_range, seq=seq_range, dtype=dtype,
                                                      opset=opset, files=report["files"],
                                                      interface=module.interface()))
        write_json(stage / REPORT_FILE, report)
    return report


def _engine(module, stage: Path, onnx_path, batch_range, seq_range, dtype, tol, specs, previous_cache):
    """Builds the engine, checks it against the module on the validation shapes and times it."""
    import torch

    from .sources import example_inputs

    input_names = [s.name for s in specs]
    profile = shapes.tensorrt_profile(specs, batch_range, seq_range)
    facts = tensorrt_build.build_engine(onnx_path, stage / PLAN_FILE, stage / CACHE_FILE, profile, dtype=dtype,
                                        previous_cache=previous_cache)
    runner = tensorrt_build.EngineRunner(stage / PLAN_FILE)
    checks = []
    for i, (label, b, t) in enumerate(shapes.validation_shapes(batch_range, seq_range)):
        inputs = example_inputs(module, b, t, seed=i)
        with torch.no_grad():
            expected = {graph.OUTPUT_NAMES[0]: module(*inputs)}
        actual = {k: v.float().numpy() for k, v in runner(dict(zip(input_names, inputs))).items()}
        outputs = validate.compare_outputs(actual, expected, tol)
        checks.append({"shape": label, "batch": b, "seq": t, "outputs": outputs,
                       "pass": all(o["pass"] for o in outputs.values())})
    timing_inputs = example_inputs(module, batch_range.opt, seq_range.opt, seed=123)
    facts["validation"] = {**validation_summary(checks), "shapes": checks}
    facts["latency_ms"] = runner.median_ms(dict(zip(input_names, timing_inputs)))
    facts["device"] = torch.cuda.get_device_name(0)
    return facts
