"""``export(source, out_dir, **options) -> report``: graph, checks, lint, optional engine, files.

Every option is checked before any work (``--seq`` against the source's limits right after it is
loaded, before anything is written); the output is staged in a temporary folder and moved into place
only when everything that must pass has passed (``files.staged_output``).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from . import graph, lint, shapes, tensorrt_build, validate
from .files import check_output_dir, copy_tokenizer_files, staged_files, staged_output, write_json
from .report import NOT_VALIDATED, export_config, failure_lines, library_versions, validation_summary
from .sources import ExportModule, input_specs, load_source, source_folders

FORMATS = ("onnx", "tensorrt", "both")
OPS = ("static", "fused")
ONNX_FILE, CONFIG_FILE, REPORT_FILE = "model.onnx", "export_config.json", "report.json"
PLAN_FILE, CACHE_FILE = "model.plan", "timing.cache"


class ExportFailed(RuntimeError):
    """Validation failed (always for a shape/name mismatch or a run failure; for tolerance with strict)."""


def _check_options(format, dtype, opset, batch, seq, atol, rtol, ops, with_past, past):
    if format not in FORMATS:
        raise ValueError(f"--format: expected one of {FORMATS}, got {format!r}")
    if dtype not in graph.DTYPES:
        raise ValueError(f"--dtype: expected one of {tuple(graph.DTYPES)}, got {dtype!r}")
    if ops not in OPS:
        raise ValueError(f"--ops: expected one of {OPS}, got {ops!r}")
    if past is not None and not with_past:
        raise ValueError("--past: sets the cache lengths of a --with-past decoder; add --with-past")
    graph.check_opset(opset)
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
    return (shapes.parse_range(batch, name="batch", option="--batch"),
            None if seq is None else shapes.parse_range(seq, name="seq", option="--seq"),
            None if past is None else shapes.parse_range(past, name="past_seq", option="--past", minimum=0))


def _seq_range(module: ExportModule, seq_range):
    """The --seq range (the source's default when not given), checked against what the model serves."""
    low, high, why = module.seq_limits()
    if seq_range is None:
        return shapes.parse_range(module.default_seq(), name="seq", option="--seq")
    return shapes.check_within(seq_range, low, high, option="--seq", why=why)


def _past_range(module: ExportModule, seq_range, past_range):
    """The --past range (default: empty cache up to the longest prompt); cache + new tokens must fit
    the model's positions where it has a limit."""
    past_range = past_range or shapes.parse_range(shapes.default_past(seq_range), name="past_seq",
                                                  option="--past", minimum=0)
    _, high, why = module.seq_limits()
    if high is not None and past_range.max + seq_range.max > high:
        raise ValueError(f"--past: cached + new tokens must stay <= {high} ({why}); got past max {past_range.max} "
                         f"+ seq max {seq_range.max}")
    return past_range


def _prefill_min(module) -> int:
    """The shortest prompt a prefill call can take (the audio-visual model's placeholders)."""
    fixed = getattr(module, "_fixed_tokens", None)
    return fixed() + 1 if fixed is not None else 1


def export(source, out_dir, *, format: str = "onnx", dtype: str = "fp32", opset: int = graph.DEFAULT_OPSET,
           batch: str = shapes.DEFAULT_BATCH, seq: str = shapes.DEFAULT_SEQ, atol: float | None = None,
           rtol: float | None = None, strict: bool = False, overwrite: bool = False, adapter=None,
           trt_version: str | None = None, with_past: bool = False, past: str | None = None,
           ops: str = "static") -> dict:
    """Exports ``source`` (see ``sources.load_source``) into ``out_dir``; returns the report (also in
    ``out_dir/report.json``). ``seq`` None: the source's default range (``ExportModule.default_seq``).
    ``with_past``: the KV-cache decoder (``with_past.py``; ``past`` its cache lengths, MIN may be 0).
    ``ops``: "static" (standard ONNX ops) or "fused" (one custom node per MoSE/AR use, ``fused.py``).
    Raises ValueError for bad options, SourceError, GraphExportError, TensorRTUnavailable or
    ExportFailed; on any error ``out_dir`` is left untouched. ``report["validation"]["status"]`` is
    "not validated" when the runtime here cannot run the graph (the folder is written)."""
    from . import fused

    batch_range, seq_range, past_range = _check_options(format, dtype, opset, batch, seq, atol, rtol, ops,
                                                        with_past, past)
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    if format != "onnx":
        tensorrt_build.require_tensorrt()
    lint.resolve_version(trt_version)  # a bad version string fails before the work
    module, _ = load_source(source, adapter=adapter)
    if with_past:
        from .with_past import with_past as decoder

        module = decoder(module)
    seq_range = _seq_range(module, seq_range)
    if with_past:
        past_range = _past_range(module, seq_range, past_range)
    reference = copy.deepcopy(module) if dtype != "fp32" else None  # low precision is checked against fp32
    module = graph.cast_module(module, dtype)
    specs = input_specs(module)
    input_names = [s.name for s in specs]
    output_names = module.output_names()
    tol = validate.default_tolerance(graph.DTYPES[dtype], rtol=rtol, atol=atol)
    previous_cache = out_dir / CACHE_FILE if (out_dir / CACHE_FILE).is_file() else None

    with staged_output(out_dir, overwrite=overwrite) as stage:
        onnx_path = stage / ONNX_FILE
        forms = fused.fused_forms() if ops == "fused" else contextlib.nullcontext()
        with forms:
            model = graph.export_onnx(module, onnx_path, batch=batch_range, seq=seq_range, opset=opset,
                                      past=past_range if with_past else None)
        validate.check_graph(onnx_path)
        problems = lint.tensorrt_lint(model, trt_version, plugins=fused.PLUGIN_OPS if ops == "fused" else ())
        if with_past:
            validation_shapes = shapes.with_past_validation_shapes(batch_range, seq_range, past_range,
                                                                   _prefill_min(module))
        else:
            validation_shapes = shapes.validation_shapes(batch_range, seq_range)
        copied = copy_tokenizer_files(source_folders(source, adapter), stage)
        files = sorted(staged_files(stage) + [CONFIG_FILE, REPORT_FILE])
        ranges = {"batch": batch_range, "seq": seq_range, **({"past": past_range} if with_past else {})}
        write_json(stage / CONFIG_FILE, export_config(model, specs, batch=batch_range, seq=seq_range, dtype=dtype,
                                                      opset=opset, files=files, interface=module.interface(),
                                                      past=past_range if with_past else None, ops=ops))
        session, load_error = _session(onnx_path, ops, dtype, specs)
        if session is None:
            checks = validate.not_run(validation_shapes, output_names,
                                      f"onnxruntime cannot run the graph here: {load_error}")
        else:
            checks = validate.validate(module, onnx_path, validation_shapes, tol, input_names=input_names,
                                       output_names=output_names, session=session, reference=reference)
        summary = validation_summary(checks)
        report = {
            "source": str(source) if not hasattr(source, "forward") else type(source).__name__,
            "format": format, "dtype": dtype, "opset": opset, "ops": ops, "with_past": with_past,
            "ranges": {name: axis.as_list() for name, axis in ranges.items()},
            "onnx_checker": "passed",
            "validation": {"tolerance": tol.as_dict(),
                           "reference": "float32 PyTorch module" if reference is not None else "PyTorch module",
                           "compared": "non-padding positions only", "strict": strict, **summary,
                           "shapes": checks},
            "op_counts": graph.op_counts(model),
            "tensorrt_lint": {"version": lint.resolve_version(trt_version), "buildable": not problems,
                              "problems": problems},
            "tokenizer_files": copied,
            "versions": library_versions(),
        }
        if with_past:
            _decoder_checks(report, module, reference, stage, session, batch_range, seq_range, tol, load_error)
        else:
            report["latency"] = validate.latency(module, session, batch_range.opt, seq_range.opt,
                                                 input_names=input_names)
        if summary["hard_fail"] or (strict and report["validation"]["status"] == "failed"):
            raise ExportFailed("validation failed: " + "; ".join(failure_lines(checks)[:3]))
        if format != "onnx":
            report["tensorrt"] = _engine(module, reference, stage, onnx_path, ranges, dtype, tol, specs,
                                         previous_cache, plugins=ops == "fused")
            if strict and not report["tensorrt"]["validation"]["pass"]:
                raise ExportFailed("TensorRT validation failed: "
                                   + "; ".join(failure_lines(report["tensorrt"]["validation"]["shapes"])[:3]))
            files = sorted(set(files) | set(staged_files(stage)))
            write_json(stage / CONFIG_FILE, {**_read(stage / CONFIG_FILE), "files": files})
        report["files"] = files
        write_json(stage / REPORT_FILE, report)
    return report


def write_graph(source, out_dir, *, dtype: str = "fp32", batch: str = shapes.DEFAULT_BATCH, seq: str | None = None,
                with_past: bool = False, past: str | None = None, opset: int = graph.DEFAULT_OPSET) -> Path:
    """``model.onnx`` and ``export_config.json`` only, into a new ``out_dir`` (no validation, no report):
    for benchmarks that time a graph whose export ``export`` validates. Returns the graph's path."""
    batch_range, seq_range, past_range = _check_options("onnx", dtype, opset, batch, seq, None, None, "static",
                                                        with_past, past)
    out_dir = check_output_dir(out_dir, overwrite=False)
    module, _ = load_source(source)
    if with_past:
        from .with_past import with_past as decoder

        module = decoder(module)
    seq_range = _seq_range(module, seq_range)
    past_range = _past_range(module, seq_range, past_range) if with_past else None
    module = graph.cast_module(module, dtype)
    specs = input_specs(module)
    with staged_output(out_dir, overwrite=False) as stage:
        model = graph.export_onnx(module, stage / ONNX_FILE, batch=batch_range, seq=seq_range, opset=opset,
                                  past=past_range)
        files = sorted(staged_files(stage) + [CONFIG_FILE])
        write_json(stage / CONFIG_FILE, export_config(model, specs, batch=batch_range, seq=seq_range, dtype=dtype,
                                                      opset=opset, files=files, interface=module.interface(),
                                                      past=past_range))
    return out_dir / ONNX_FILE


def _read(path):
    import json

    return json.loads(path.read_text())


def _session(onnx_path, ops, dtype, specs):
    """(onnxruntime session or None, why not): a fused graph gets the project's custom ops registered."""
    if ops == "fused" and dtype != "fp32":
        return None, ("the onnxruntime custom ops of --ops fused run float32 graphs only; a fused fp16/bf16 graph "
                      "is checked by the TensorRT engine build (--format both)")
    bf16_inputs = [s.name for s in specs if s.dtype == "bfloat16"]
    if bf16_inputs:
        return None, f"numpy cannot hold the bfloat16 inputs {bf16_inputs[:2]} that onnxruntime's Python API feeds"
    try:
        if ops == "fused":
            from .ort_custom_ops import fused_session

            return fused_session(onnx_path), None
        return validate.ort_session(onnx_path), None
    except Exception as err:  # noqa: BLE001  (e.g. bf16 kernels missing on the CPU provider)
        return None, str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__


def _decoder_checks(report, module, reference, stage, session, batch_range, seq_range, tol, load_error):
    """The with-past decoder's greedy decoding check and prefill/decode latency (report entries)."""
    from .decode_check import DECODE_TOKENS, decoder_latency, greedy_check

    prompt = max(seq_range.opt, _prefill_min(module))
    if session is None:
        report["decode_check"] = {"status": NOT_VALIDATED, "pass": False,
                                  "reason": f"onnxruntime cannot run the graph here: {load_error}"}
    else:
        check = greedy_check(module, reference or module, stage, batch_range.opt, prompt, tol.rtol,
                             session=session, max_new_tokens=DECODE_TOKENS)
        check["status"] = "passed" if check["pass"] else "failed"
        report["decode_check"] = check
        validation = report["validation"]
        validation["pass"] = validation["pass"] and check["pass"]
        if validation["status"] == "passed" and not check["pass"]:
            validation["status"] = "failed"
    report["latency"] = decoder_latency(module, session, batch_range.opt, prompt)


def _engine(module, reference, stage: Path, onnx_path, ranges, dtype, tol, specs, previous_cache, *, plugins):
    """Builds the engine, checks it against the (float32) module on the validation shapes and times it
    on device buffers."""
    import torch

    from .sources import example_inputs

    input_names = [s.name for s in specs]
    past = ranges.get("past")
    profile = shapes.tensorrt_profile(specs, ranges["batch"], ranges["seq"], past)
    if plugins:
        from . import trt_plugins

        trt_plugins.register()  # before the ONNX parser runs
    facts = tensorrt_build.build_engine(onnx_path, stage / PLAN_FILE, stage / CACHE_FILE, profile, dtype=dtype,
                                        previous_cache=previous_cache)
    runner = tensorrt_build.EngineRunner(stage / PLAN_FILE)
    cases = (shapes.with_past_validation_shapes(ranges["batch"], ranges["seq"], past, _prefill_min(module))
             if past is not None else shapes.validation_shapes(ranges["batch"], ranges["seq"]))
    ref = reference if reference is not None else module
    checks = []
    for i, case in enumerate(cases):
        label, b, t, p = validate._case(case)
        inputs = example_inputs(module, b, t, seed=i, past=p)
        with torch.no_grad():
            expected = ref(*(inputs if ref is module else validate.as_float32(inputs)))
        expected = dict(zip(module.output_names(), expected if isinstance(expected, tuple) else (expected,)))
        actual = {k: v.float().numpy() for k, v in runner(dict(zip(input_names, inputs))).items()}
        outputs = validate.compare_outputs(actual, expected, tol, module.output_masks(inputs))
        checks.append({"shape": label, "batch": b, "seq": t, **({"past": p} if p is not None else {}),
                       "outputs": outputs, "pass": all(o["pass"] for o in outputs.values())})
    timing_inputs = example_inputs(module, ranges["batch"].opt, ranges["seq"].opt, seed=123,
                                   past=0 if past is not None else None)
    facts["validation"] = {**validation_summary(checks), "shapes": checks}
    facts["latency_ms"] = runner.median_ms(dict(zip(input_names, timing_inputs)))
    facts["latency_note"] = "median of CUDA-event timed enqueues on device-resident inputs and outputs"
    facts["device"] = torch.cuda.get_device_name(0)
    return facts
