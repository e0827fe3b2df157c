"""Validation of an exported graph: onnx.checker, then onnxruntime against the PyTorch module.

What is compared: only the output elements that carry meaning (``ExportModule.output_masks``): the
logits of real tokens, never of left padding (whose logits mean nothing), and the cache rows of real
tokens. The reference is the float32 PyTorch module for every export dtype (a low-precision PyTorch
run drifts from the true function as much as the graph does), fed the graph's exact inputs.

Tolerances (precision-aware): the pass criterion is the project's table (``mosear_fast.tolerances``),
the relative error ``||ort - torch|| / ||torch||`` of each output, bound by ``rtol`` (default: the
table's value for the export dtype: fp32 1e-5, fp16 5e-3, bf16 1e-2); ``atol``, when given, also
bounds the largest elementwise difference (off by default: logits scale with the model, so a fixed
absolute bound has no precision-aware default). A missing output, an output-name or shape mismatch,
NaN/inf, or a runtime failure always fails; a tolerance miss fails the export only with ``strict``
(it is reported either way). A graph the installed runtime cannot run at all (bf16 on the CPU
provider) is "not validated" (``not_run``): neither passed nor failed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from mosear_fast.tolerances import rel_error, tolerance

from .sources import ExportModule, example_inputs

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
LATENCY_WARMUP, LATENCY_RUNS = 2, 10


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float | None

    def as_dict(self):
        return {"rel_error_max": self.rtol, "max_abs_diff_max": self.atol,
                "rel_error": "||onnx - torch|| / ||torch|| (Frobenius)"}


def default_tolerance(dtype: torch.dtype, *, rtol=None, atol=None) -> Tolerance:
    return Tolerance(tolerance(dtype) if rtol is None else float(rtol), None if atol is None else float(atol))


def check_graph(path) -> None:
    """onnx.checker on the file (by path, so external weights are followed)."""
    onnx.checker.check_model(str(path), full_check=True)


def ort_session(path, providers=None):
    """An onnxruntime session on the best installed provider (TensorRT, then CUDA, then CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = [p for p in (providers or PREFERRED_PROVIDERS) if p in available] or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=chosen)
    except Exception:  # noqa: BLE001  (a GPU provider that fails to start: fall back to the CPU)
        if chosen == ["CPUExecutionProvider"]:
            raise
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(inputs, names):
    return {name: t.numpy() for name, t in zip(names, inputs)}



def within_tolerance(rel_err: float, max_abs: float, tol: Tolerance) -> bool:
    """The pass rule: relative error within ``rtol`` and, when ``atol`` is set, the largest elementwise
    difference within ``atol`` (False for NaN)."""
    return bool(rel_err <= tol.rtol and (tol.atol is None or max_abs <= tol.atol))


def compare_outputs(actual: dict, expected: dict, tol: Tolerance, masks: dict | None = None) -> dict:
    """Per output name: shapes, max abs / rel diff, relative error, pass. Names must match exactly.
    ``masks``: output name -> bool array broadcastable to the output; only its True elements count."""
    results = {}
    for name in sorted(set(actual) | set(expected)):
        if name not in actual or name not in expected:
            where = "missing from the graph" if name not in actual else "not produced by the module"
            results[name] = {"pass": False, "hard_fail": True, "reason": f"output {name!r} is {where}"}
            continue
        a = np.asarray(actual[name], dtype=np.float64)
        e = expected[name].detach().double().cpu().numpy()
        if a.shape != e.shape:
            results[name] = {"pass": False, "hard_fail": True,
                             "reason": f"shape {list(a.shape)} differs from the module's {list(e.shape)}"}
            continue
        mask = None if masks is None or masks.get(name) is None else np.asarray(masks[name].cpu() if hasattr(
            masks[name], "cpu") else masks[name], dtype=bool)
        compared = np.broadcast_to(mask, a.shape) if mask is not None else np.ones(a.shape, dtype=bool)
        a_sel, e_sel = a[compared], e[compared]
        finite = bool(np.isfinite(a_sel).all() and np.isfinite(e_sel).all())
        diff = np.abs(a_sel - e_sel)
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float((diff / np.maximum(np.abs(e_sel), 1e-12)).max()) if diff.size else 0.0
        err = rel_error(torch.from_numpy(a_sel), torch.from_numpy(e_sel)) if finite else float("inf")
        results[name] = {"shape": list(a.shape), "compared": int(compared.sum()), "max_abs_diff": max_abs,
                         "max_rel_diff": max_rel, "rel_error": err,
                         "pass": finite and within_tolerance(err, max_abs, tol), "hard_fail": not finite}
        if not finite:
            results[name]["reason"] = "NaN or inf in the outputs"
    return results


def _case(case):
    """(label, batch, seq, past or None) of a validation shape (prefill shapes have no past)."""
    label, batch, length, *rest = case
    return label, batch, length, (rest[0] if rest else None)


def as_float32(inputs) -> tuple:
    return tuple(t.float() if t.is_floating_point() else t for t in inputs)


def validate(module: ExportModule, path, shapes, tol: Tolerance, *, input_names, output_names, seed: int = 0,
             session=None, reference: ExportModule | None = None) -> list[dict]:
    """onnxruntime vs ``reference`` (default: the module itself; the float32 module for a low-precision
    graph, fed the same inputs in float32) on each (label, batch, length[, past]) of ``shapes``, with
    random valid inputs, comparing the meaningful elements only (``module.output_masks``)."""
    session = session or ort_session(path)
    reference = module if reference is None else reference
    graph_outputs = [o.name for o in session.get_outputs()]
    results = []
    for i, case in enumerate(shapes):
        label, batch, length, past = _case(case)
        inputs = example_inputs(module, batch, length, seed=seed + i, past=past)
        with torch.no_grad():
            expected = reference(*(inputs if reference is module else as_float32(inputs)))
        expected = dict(zip(output_names, expected if isinstance(expected, tuple) else (expected,)))
        entry = {"shape": label, "batch": batch, "seq": length, "provider": session.get_providers()[0]}
        if past is not None:
            entry["past"] = past
        try:
            actual = dict(zip(graph_outputs, session.run(None, _feeds(inputs, input_names))))
        except Exception as err:  # noqa: BLE001  (the runtime's own error, reported per shape)
            entry["outputs"] = {n: {"pass": False, "hard_fail": True, "reason": f"onnxruntime failed: {err}"[:300]}
                                for n in output_names}
        else:
            entry["outputs"] = compare_outputs(actual, expected, tol, module.output_masks(inputs))
        entry["pass"] = all(o["pass"] for o in entry["outputs"].values())
        results.append(entry)
    return results


def not_run(shapes, output_names, reason: str) -> list[dict]:
    """Validation entries for a graph onnxruntime cannot load here: "not validated" (neither passed nor
    failed); the export reports it and the command exits with its own status."""
    entries = []
    for case in shapes:
        label, b, t, past = _case(case)
        entry = {"shape": label, "batch": b, "seq": t, "provider": None, "pass": False,
                 "outputs": {n: {"pass": False, "hard_fail": False, "not_run": True, "reason": reason}
                             for n in output_names}}
        if past is not None:
            entry["past"] = past
        entries.append(entry)
    return entries


def median_ms(run) -> float:
    """Median wall time of ``run()`` in ms over LATENCY_RUNS calls, after LATENCY_WARMUP."""
    for _ in range(LATENCY_WARMUP):
        run()
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def latency(module: ExportModule, session, batch: int, length: int, *, input_names) -> dict:
    """Median latency (ms) of the module (PyTorch) and of the onnxruntime session on one shape."""
    inputs = example_inputs(module, batch, length, seed=123)
    feeds = _feeds(inputs, input_names)
    device = next(module.parameters()).device
    with torch.no_grad():
        torch_ms = median_ms(lambda: module(*inputs))
    ort_ms = median_ms(lambda: session.run(None, feeds)) if session is not None else None
    return {"batch": batch, "seq": length, "runs": LATENCY_RUNS, "statistic": "median",
            "pytorch_ms": torch_ms, "pytorch_device": str(device),
            "onnxruntime_ms": ort_ms, "onnxruntime_provider": session.get_providers()[0] if session else None,
            "onnxruntime_over_pytorch": ort_ms / torch_ms if ort_ms is not None and torch_ms > 0 else None}
