"""``python -m bench.e2e``: end-to-end benchmarks of MoSEAR on decoder stacks with real widths.

For each preset model (``bench.presets.E2E_MODELS``: LLaMA-2-7B, the Qwen2.5-Omni-7B thinker; tiny
CPU stand-ins) with a few layers and random weights, on a prompt laid out like an audio-visual one
(text, visual span, audio span, text), it measures:

- prefill latency (batch 1) at each prompt length of the preset;
- decode tokens/s at batch 1 and 8: a prefill (untimed), then ``decode_tokens`` greedy steps with
  the KV cache (timed);
- one training step (forward + backward; loss = LM cross-entropy + MoSE's aux loss), tokens/s and
  peak memory: the MoSE adapters are trained with the backbone frozen and AR off (AR is an
  inference-time method); the floor's step is the frozen backbone's forward + backward to its input
  embeddings;

for the variants

- ``backbone``: the decoder alone, sdpa attention (the floor);
- ``mosear_eager``: MoSE + AR computed as research code does (``bench.e2e_eager``: per-(modality,
  expert) loops, materialised attention probabilities);
- ``mosear_fast``: ``apply_mosear`` with backend "auto" (Triton kernels on CUDA, the PyTorch backend
  on the CPU);
- ``onnxruntime``: the model exported by ``mosear_fast.export``, in onnxruntime (its CUDA provider on a
  GPU where installed, else the CPU provider on a CPU run); prefill only (the graph has no KV cache);
- ``mosear_compiled``: ``mosear_fast`` under ``torch.compile(model, fullgraph=True)`` (every MoSE and AR
  call one ``mosear::`` op; ``--compile-backend``, default inductor): the decode steps (prefill eager,
  then compiled steps on a static KV cache) and the training step, compile time excluded (warm-up);
  reported with its time relative to ``mosear_fast`` (``ratio_to_mosear_fast``).

Numbers are medians (CUDA events on a GPU, a wall clock on the CPU), reported for the measured stack,
per layer, and scaled to the real depth (per layer x ``full_layers``: an estimate). The JSON states
the issue's targets and, on a CUDA run in bf16, whether each was met.

Examples:
    python -m bench.e2e --preset cpu-small
    python -m bench.e2e --preset gpu --models llama2-7b --out /tmp/e2e.json
    python -m bench.e2e --variants mosear_fast,mosear_compiled --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch

from mosear_fast.atomic import atomic_write_json

from . import presets
from .environment import describe
from .timing import measure

VARIANTS = {
    "backbone": "the decoder alone, sdpa attention (floor)",
    "mosear_fast": "apply_mosear, backend auto (Triton kernels on CUDA, the PyTorch backend on the CPU)",
    "mosear_eager": "MoSE per-(modality, expert) loops + AR on materialised probabilities (bench/e2e_eager.py)",
    "mosear_compiled": "mosear_fast under torch.compile(model, fullgraph=True) (--compile-backend, default inductor): "
                       "the decode steps (static KV cache) and the training step; compile time excluded; no prefill",
    "onnxruntime": "the exported graphs (mosear_fast.export) in onnxruntime: prefill graph; decode with the "
                   "--with-past graph through OnnxGenerator",
}
FLOOR, EAGER, FAST, ORT, COMPILED = "backbone", "mosear_eager", "mosear_fast", "onnxruntime", "mosear_compiled"
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def guarded(log, label, fn) -> dict:
    """``fn()``, or ``{"skipped": reason}`` when it runs out of memory or fails (the run goes on)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        return dict(skipped="out of memory")
    except Exception as err:  # noqa: BLE001  (one failed measurement must not end the run)
        log(f"{label}: failed: {_first_line(err)}")
        traceback.print_exc(file=sys.stderr)
        return dict(skipped=_first_line(err))


def timed(fn, device, timing: dict) -> dict:
    """``bench.timing.measure`` plus the memory allocated before the run (CUDA)."""
    _sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    result = measure(fn, device, **timing)
    result["allocated_before_bytes"] = before
    if device.type != "cuda":
        result["peak_memory_note"] = "no allocator statistics on the CPU"
    return result


# -------------------------------------------------------------------------------------------------
# The three measurements
# -------------------------------------------------------------------------------------------------


def prefill_fn(model, ids, modality):
    kwargs = dict(input_ids=ids, use_cache=False, logits_to_keep=1)
    if modality is not None:
        kwargs["modality_ids"] = modality

    def run():
        with torch.no_grad():
            return model(**kwargs).logits
    return run


def measure_decode(model, ids, modality, new_tokens: int, device, *, reps: int, warmup: int = 1,
                   step_model=None) -> dict:
    """Median time of ``new_tokens`` greedy steps after an (untimed) prefill of ``ids``. ``step_model``
    (a compiled ``model``) runs the steps instead, with a static KV cache (what compiled decoding uses);
    the warm-up rounds compile it."""
    from .e2e_models import cache_kwargs, new_cache, new_static_cache

    step = model if step_model is None else step_model  # (a compiled module has no truth value)
    times, peaks = [], []
    for rep in range(warmup + reps):
        with torch.no_grad():
            cache = new_cache(model) if step_model is None else new_static_cache(model, ids.shape[1] + new_tokens)
            kwargs = dict(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
            if modality is not None:
                kwargs["modality_ids"] = modality
            token = model(**kwargs).logits[:, -1:].argmax(-1)
            _sync(device)
            if device.type == "cuda":
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            started = time.perf_counter()
            for i in range(new_tokens):
                # compiled steps get the 2-D mask as generate passes it (the static cache's length from its shape)
                length = ids.shape[1] + i + 1
                mask = {} if step_model is None else dict(attention_mask=ids.new_ones(ids.shape[0], length))
                token = step(input_ids=token, use_cache=True, **mask, **cache_kwargs(model, cache)).logits[:, -1:]
                token = token.argmax(-1)
            if device.type == "cuda":
                end.record()
                end.synchronize()
                elapsed = begin.elapsed_time(end)
                peaks.append(torch.cuda.max_memory_allocated(device) - before)
            else:
                elapsed = (time.perf_counter() - started) * 1e3
            del cache
        if rep >= warmup:
            times.append(elapsed)
    result = dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), runs=len(times),
                  peak_memory_bytes=max(peaks) if peaks else None)
    if device.type != "cuda":
        result["peak_memory_note"] = "no allocator statistics on the CPU"
    return result


def train_step_fn(model, ids, modality, *, floor: bool, forward=None):
    """One forward + backward. Floor: the frozen backbone, gradient to its input embeddings. MoSEAR:
    gradients to the MoSE adapters (backbone frozen); loss = cross-entropy + ``aux_loss``; ``forward``
    (a compiled ``model``) runs the forward instead."""
    if floor:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)

        def step():
            model(inputs_embeds=embeds, labels=ids, use_cache=False).loss.backward()
            embeds.grad = None
        return step
    from mosear_fast import aux_loss

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: no trainable parameter (MoSE adapters expected)")

    forward = model if forward is None else forward

    def step():
        out = forward(input_ids=ids, modality_ids=modality, labels=ids, use_cache=False)
        (out.loss + aux_loss(model)).backward()
        for p in params:
            p.grad = None
    return step


def measure_train(model, ids, modality, device, timing, *, floor: bool, forward=None) -> dict:
    from .e2e_models import attention_implementation

    model.train()
    try:
        if floor:
            return timed(train_step_fn(model, ids, None, floor=True), device, timing)
        with attention_implementation(model, "sdpa"):  # AR off: an inference-time method
            return timed(train_step_fn(model, ids, modality, floor=False, forward=forward), device, timing)
    finally:
        model.eval()


# -------------------------------------------------------------------------------------------------
# One model
# -------------------------------------------------------------------------------------------------


def _rel_err(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_model(name: str, preset: dict, device: torch.device, variants, *, log=print, workdir=None,
              compile_backend: str = "inductor") -> dict:
    from .e2e_eager import eager_ops
    from .e2e_models import add_mosear, av_prompt, build_decoder, model_bytes

    spec = presets.E2E_MODELS[name]
    layers, timing = preset["layers"], preset["timing"]
    tag = f"[{name}]"
    started = time.perf_counter()
    model = build_decoder(name, layers, dtype=preset["dtype"], device=device).requires_grad_(False)
    log(f"{tag} built: {layers} layers, hidden {spec['hidden']}, heads {spec['heads']}/{spec['kv_heads']}, "
        f"MLP {spec['mlp']}, {model_bytes(model) / 2**20:.0f} MiB of weights ({time.perf_counter() - started:.1f} s)")
    vocab = spec["vocab"]
    prefill_in = {n: av_prompt(1, n, vocab, device=device, seed=n) for n in preset["prefill_lengths"]}
    decode_in = {b: av_prompt(b, preset["decode_context"], vocab, device=device, seed=b)
                 for b in preset["decode_batches"]}
    train_in = av_prompt(preset["train_batch"], preset["train_length"], vocab, device=device, seed=7)
    prefill = {n: {} for n in prefill_in}
    decode = {b: {} for b in decode_in}
    train = {}

    def measure_all(variant, modality_on, compiled=None):
        for n, (ids, mod) in ([] if compiled is not None else prefill_in.items()):
            label = f"{tag} prefill L={n} {variant}"
            prefill[n][variant] = guarded(log, label, lambda ids=ids, mod=mod: timed(
                prefill_fn(model, ids, mod if modality_on else None), device, timing))
            _log_time(log, label, prefill[n][variant])
            _free(device)
        for b, (ids, mod) in decode_in.items():
            label = f"{tag} decode B={b} {variant}"
            decode[b][variant] = guarded(log, label, lambda ids=ids, mod=mod: measure_decode(
                model, ids, mod if modality_on else None, preset["decode_tokens"], device,
                reps=preset["decode_reps"], step_model=compiled))
            _log_time(log, label, decode[b][variant])
            _free(device)
        label = f"{tag} train B={preset['train_batch']} L={preset['train_length']} {variant}"
        train[variant] = guarded(log, label, lambda: measure_train(model, *train_in, device, timing,
                                                                      floor=not modality_on, forward=compiled))
        _log_time(log, label, train[variant])
        _free(device)

    if FLOOR in variants:
        measure_all(FLOOR, False)
    add_mosear(model, preset)
    parity, onnx_info = {}, None
    first_ids, first_mod = prefill_in[min(prefill_in)]
    if FAST in variants or EAGER in variants or ORT in variants:
        reference = guarded(log, f"{tag} parity", lambda: {"logits": prefill_fn(model, first_ids, first_mod)()})
        if EAGER in variants and "logits" in reference:
            with eager_ops():
                eager_logits = guarded(log, f"{tag} parity eager",
                                       lambda: {"logits": prefill_fn(model, first_ids, first_mod)()})
            if "logits" in eager_logits:
                parity["eager_vs_fast_rel_err"] = _rel_err(eager_logits["logits"], reference["logits"])
    if ORT in variants:
        onnx_info = _measure_ort(model, preset, device, prefill_in, prefill, reference.get("logits"), parity,
                                 log=log, tag=tag, workdir=workdir)
        onnx_info["decode"] = _measure_ort_decode(model, preset, device, decode_in, decode, log=log, tag=tag,
                                                  workdir=workdir)
    if FAST in variants:
        measure_all(FAST, True)
    if COMPILED in variants:
        # a fresh compiler cache per model: the models share code objects (transformers' decorators), whose
        # graphs of the previous model would count against the recompile limit
        torch._dynamo.reset()
        measure_all(COMPILED, True, compiled=torch.compile(model, fullgraph=True, backend=compile_backend))
    if EAGER in variants:
        with eager_ops():
            measure_all(EAGER, True)
    order = [v for v in VARIANTS if v in variants]
    for cells in [*prefill.values(), *decode.values(), train]:
        ordered = {v: cells[v] for v in order if v in cells}
        cells.clear()
        cells.update(ordered)
    weights = model_bytes(model)
    model = None  # frees the weights before the next model is built
    _free(device)
    result = dict(
        model=name, dims={k: spec[k] for k in ("arch", "hidden", "heads", "kv_heads", "mlp", "vocab")},
        layers=layers, full_layers=spec["full_layers"], weights_bytes=weights,
        prefill=[dict(batch=1, length=n, variants=prefill[n]) for n in prefill],
        decode=[dict(batch=b, context=preset["decode_context"], new_tokens=preset["decode_tokens"],
                     variants=decode[b]) for b in decode],
        train=[dict(batch=preset["train_batch"], length=preset["train_length"], variants=train)],
        parity=parity, onnx=onnx_info, seconds=round(time.perf_counter() - started, 1))
    derive(result)
    return result


def _measure_ort(model, preset, device, prefill_in, prefill, reference, parity, *, log, tag, workdir):
    """Exports once, then times the graph at every prefill length. Returns the export's details."""
    from .e2e_models import OrtPrefill, export_onnx_file, ort_providers

    providers, reason = ort_providers(device)
    info = {}
    if reason is None:
        lengths = sorted(prefill_in)
        try:
            with tempfile.TemporaryDirectory(dir=workdir) as folder:
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    path, api = export_onnx_file(model, folder, dtype_name=preset["onnx_dtype"],
                                                 seq=(1, lengths[0], lengths[-1]))
                info.update(api=api, dtype=preset["onnx_dtype"], export_seconds=round(time.perf_counter() - started, 1))
                session = OrtPrefill(path, providers)
                info.update(provider=session.provider, session_seconds=round(session.session_seconds, 1))
                log(f"{tag} onnx: exported with {api} in {info['export_seconds']} s, {session.provider}")
                ort_device = torch.device("cpu")  # session.run is synchronous: a wall clock times it
                for n, (ids, mod) in prefill_in.items():
                    label = f"{tag} prefill L={n} {ORT}"
                    prefill[n][ORT] = guarded(log, label, lambda ids=ids, mod=mod: timed(
                        session.bind(ids, mod), ort_device, preset["timing"]))
                    if device.type == "cuda" and "median_ms" in prefill[n][ORT]:
                        prefill[n][ORT].pop("peak_memory_note", None)
                    _log_time(log, label, prefill[n][ORT])
                if reference is not None:
                    ids, mod = prefill_in[lengths[0]]
                    parity["onnxruntime_vs_fast_rel_err"] = _rel_err(session.last_logits(ids, mod),
                                                                     reference[:, -1])
                del session
        except Exception as err:  # noqa: BLE001  (the export is another team's work in progress)
            traceback.print_exc(file=sys.stderr)
            reason = f"export or session failed: {_first_line(err)}"
    return _ort_skipped(info, reason, prefill, log=log, label=f"{tag} {ORT}")


def _measure_ort_decode(model, preset, device, decode_in, decode, *, log, tag, workdir):
    """The --with-past graph (mosear_fast.export) in onnxruntime: ``decode_tokens`` greedy steps after an
    untimed prefill, through ``OnnxGenerator`` (IO binding on CUDA), per decode batch."""
    from mosear_fast.export import OnnxGenerator
    from mosear_fast.export.pipeline import write_graph

    from .e2e_models import ort_providers

    providers, reason = ort_providers(device)
    info = {}
    if reason is None:
        try:
            with tempfile.TemporaryDirectory(dir=workdir) as folder:
                context, steps = preset["decode_context"], preset["decode_tokens"]
                batches = sorted(decode_in)
                source = copy.deepcopy(model).to("cpu", torch.float32).eval()
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    write_graph(source, os.path.join(folder, "decoder"), dtype=preset["onnx_dtype"],
                                batch=f"{batches[0]}:{batches[0]}:{batches[-1]}", seq=f"1:{context}:{context}",
                                with_past=True, past=f"0:{context}:{context + steps}")
                info["export_seconds"] = round(time.perf_counter() - started, 1)
                generator = OnnxGenerator(os.path.join(folder, "decoder"), providers=providers)
                info["provider"] = generator.provider
                for b, (ids, mod) in decode_in.items():
                    label = f"{tag} decode B={b} {ORT}"
                    decode[b][ORT] = guarded(log, label, lambda ids=ids, mod=mod: _time_generator(
                        generator, ids, mod, steps, reps=preset["decode_reps"]))
                    _log_time(log, label, decode[b][ORT])
        except Exception as err:  # noqa: BLE001  (reported in the results, like the prefill variant)
            traceback.print_exc(file=sys.stderr)
            reason = f"export or session failed: {_first_line(err)}"
    return _ort_skipped(info, reason, decode, log=log, label=f"{tag} {ORT} decode")


def _ort_skipped(info: dict, reason: str | None, cells: dict, *, log, label: str) -> dict:
    """``info``, with the onnxruntime cell of every row of ``cells`` marked skipped when ``reason`` is set."""
    if reason is not None:
        log(f"{label}: skipped: {reason}")
        for row in cells.values():
            row[ORT] = dict(skipped=reason)
        info["skipped"] = reason
    return info


def _time_generator(generator, ids, mod, steps: int, *, reps: int, warmup: int = 1) -> dict:
    """Median time of ``steps`` decode calls: from the first token (after the prefill) to the last."""
    times = []
    for rep in range(warmup + reps):
        marks = []
        generator.generate(ids.cpu().numpy(), mod.cpu().numpy(), max_new_tokens=steps + 1, eos_token_id=None,
                           progress=lambda _, marks=marks: marks.append(time.perf_counter()))
        if rep >= warmup:
            times.append((marks[-1] - marks[0]) * 1e3)
    return dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), runs=len(times),
                per_token_ms=statistics.median(times) / steps)


def _log_time(log, label, t):
    if "median_ms" in t:
        log(f"{label}: {t['median_ms']:.3f} ms (median of {t['runs']})")
    else:
        log(f"{label}: skipped ({t.get('skipped')})")


# -------------------------------------------------------------------------------------------------
# Derived numbers and targets
# -------------------------------------------------------------------------------------------------


def derive(result: dict) -> None:
    """Adds per-layer, scaled, tokens/s, ratio-to-floor and speed-up-over-eager numbers in place."""
    layers, full = result["layers"], result["full_layers"]
    for kind in ("prefill", "decode", "train"):
        for row in result[kind]:
            cells = row["variants"]
            floor = cells.get(FLOOR, {}).get("median_ms")
            eager = cells.get(EAGER, {}).get("median_ms")
            fast = cells.get(FAST, {}).get("median_ms")
            for t in cells.values():
                if "median_ms" not in t:
                    continue
                ms = t["median_ms"]
                if kind == "decode":
                    tokens = row["batch"] * row["new_tokens"]
                    t["ms_per_step"] = ms / row["new_tokens"]
                    t["per_layer_ms"] = t["ms_per_step"] / layers
                    t["tokens_per_s"] = tokens / (ms * 1e-3)
                    t["scaled_tokens_per_s"] = row["batch"] / (t["per_layer_ms"] * full * 1e-3)
                else:
                    tokens = row["batch"] * row["length"]
                    t["per_layer_ms"] = ms / layers
                    t["scaled_ms"] = t["per_layer_ms"] * full
                    t["tokens_per_s"] = tokens / (ms * 1e-3)
                    t["scaled_tokens_per_s"] = tokens / (t["scaled_ms"] * 1e-3)
                t["ratio_to_floor"] = ms / floor if floor else None
                t["speedup_over_eager"] = eager / ms if eager else None
            if "median_ms" in cells.get(COMPILED, {}):  # compiled against the same ops run eagerly
                cells[COMPILED]["ratio_to_mosear_fast"] = cells[COMPILED]["median_ms"] / fast if fast else None


def _cell(result, kind, variant, **match):
    for row in result[kind]:
        if all(row.get(k) == v for k, v in match.items()):
            return row["variants"].get(variant, {})
    return {}


def evaluate_targets(result: dict, *, device_type: str, dtype: torch.dtype) -> list[dict]:
    """The issue's targets for one model, each with its measured value and ``met`` (None unless the run
    was on CUDA in bf16, where the targets apply)."""
    goals = presets.E2E_TARGETS
    checked = device_type == "cuda" and dtype == torch.bfloat16
    note = None if checked else "targets apply to an H100/H200 in bf16; not checked on this run"
    length = goals["prefill_length"]
    fast_prefill = _cell(result, "prefill", FAST, length=length)
    targets = [
        dict(name=f"prefill {length}: mosear_fast within {goals['prefill_ratio_to_floor']}x of the backbone",
             value=fast_prefill.get("ratio_to_floor"), op="<=", limit=goals["prefill_ratio_to_floor"]),
        dict(name=f"prefill {length}: mosear_fast >= {goals['prefill_speedup_over_eager']}x faster than eager",
             value=fast_prefill.get("speedup_over_eager"), op=">=", limit=goals["prefill_speedup_over_eager"]),
    ]
    for row in result["decode"]:
        cell = row["variants"].get(FAST, {})
        targets.append(dict(name=f"decode B={row['batch']}: mosear_fast within {goals['decode_ratio_to_floor']}x "
                                 "of the backbone (time per token)",
                            value=cell.get("ratio_to_floor"), op="<=", limit=goals["decode_ratio_to_floor"]))
    for row in result["train"]:
        fast, eager = row["variants"].get(FAST, {}), row["variants"].get(EAGER, {})
        targets.append(dict(name=f"train B={row['batch']} L={row['length']}: mosear_fast >= "
                                 f"{goals['train_speedup_over_eager']}x the tokens/s of eager",
                            value=fast.get("speedup_over_eager"), op=">=", limit=goals["train_speedup_over_eager"]))
        fast_peak, eager_peak = fast.get("peak_memory_bytes"), eager.get("peak_memory_bytes")
        targets.append(dict(name=f"train B={row['batch']} L={row['length']}: mosear_fast peak memory below eager's",
                            value=(fast_peak / eager_peak) if fast_peak and eager_peak else None, op="<", limit=1.0))
    for t in targets:
        if not checked:
            t["met"], t["note"] = None, note
        elif t["value"] is None:
            t["met"], t["note"] = None, "not measured in this run"
        else:
            t["met"] = bool(t["value"] <= t["limit"] if t["op"] == "<=" else t["value"] >= t["limit"]
                            if t["op"] == ">=" else t["value"] < t["limit"])
    return targets


# -------------------------------------------------------------------------------------------------
# Runner and CLI
# -------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    env = describe(device)
    env["threads"] = torch.get_num_threads()
    for package in ("transformers", "peft", "onnxruntime"):
        try:
            env[package] = __import__(package).__version__
        except ImportError:
            env[package] = None
    return env


def run(preset_name: str, device: torch.device, *, models=None, variants=None, log=print, workdir=None,
        preset: dict | None = None, on_progress=None, compile_backend: str = "inductor") -> dict:
    """Measures every selected model and variant; returns the JSON-ready result. ``on_progress`` is
    called with the result so far (``"complete": False``) after each model."""
    preset = dict(preset) if preset is not None else presets.e2e_preset(preset_name)
    models = list(models or preset["models"])
    unknown = sorted(set(models) - set(presets.E2E_MODELS))
    if unknown:
        raise ValueError(f"models: unknown {unknown}; known: {sorted(presets.E2E_MODELS)}")
    variants = list(variants or VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; known: {list(VARIANTS)}")
    env = environment(device)
    settings = _settings(preset)
    if COMPILED in variants:
        settings["compile_backend"] = compile_backend
    log(f"e2e {preset_name} on {env['device']} (torch {env['torch']}, transformers {env['transformers']})")
    results = []
    for name in models:
        result = run_model(name, preset, device, variants, log=log, workdir=workdir, compile_backend=compile_backend)
        result["targets"] = evaluate_targets(result, device_type=device.type, dtype=preset["dtype"])
        results.append(result)
        log(format_model(result))
        if on_progress is not None:
            on_progress(_document(preset_name, env, settings, variants, results, complete=False))
    return _document(preset_name, env, settings, variants, results, complete=True)


def _document(preset_name, env, settings, variants, results, *, complete):
    return dict(kind="e2e", preset=preset_name, environment=env, settings=settings, floor=FLOOR, eager=EAGER,
                variants={v: VARIANTS[v] for v in VARIANTS if v in variants}, targets_apply="CUDA (H100/H200), bf16",
                complete=complete, models=list(results))


def _settings(preset):
    return dict(
        layers=preset["layers"], dtype=str(preset["dtype"]).replace("torch.", ""),
        prefill_lengths=list(preset["prefill_lengths"]), decode_batches=list(preset["decode_batches"]),
        decode_context=preset["decode_context"], decode_tokens=preset["decode_tokens"],
        train_batch=preset["train_batch"], train_length=preset["train_length"],
        mose=dict(target_modules=["q_proj", "v_proj"], r=preset["rank"], alpha=16.0,
                  num_experts=preset["num_experts"], top_k=preset["top_k"], modalities=3, routing="token"),
        ar=dict(layers="all", strength=0.5, balance=["visual", "audio"], query_modalities=["text"]),
        prompt="text 1/8, visual 1/2, audio 1/8, text (tests.cases.av_layout)",
        training="MoSE adapters trained (loss: LM cross-entropy + aux_loss), backbone frozen, AR off "
                 "(inference-time); floor: frozen backbone, gradient to the input embeddings",
        timing={k: v for k, v in preset["timing"].items()}, decode_reps=preset["decode_reps"],
        onnx_dtype=preset["onnx_dtype"])


def _fmt(value, spec=".3g", suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_model(result: dict) -> str:
    """A short plain-text table of one model's results (the GPU script prints these last)."""
    lines = [f"{result['model']} ({result['layers']} layers; ms of the measured stack)"]
    for kind in ("prefill", "decode", "train"):
        for row in result[kind]:
            where = (f"L={row['length']}" if kind != "decode" else f"ctx={row['context']}") + f" B={row['batch']}"
            cells = []
            for name, t in row["variants"].items():
                if "median_ms" not in t:
                    cells.append(f"{name} -")
                    continue
                value = (f"{t['tokens_per_s']:.4g} tok/s" if kind != "prefill" else f"{t['median_ms']:.4g} ms")
                extra = []
                if t.get("ratio_to_floor") is not None and name != FLOOR:
                    extra.append(f"{t['ratio_to_floor']:.2f}x floor")
                if t.get("speedup_over_eager") is not None and name not in (EAGER, FLOOR):
                    extra.append(f"{t['speedup_over_eager']:.2f}x over eager")
                if t.get("ratio_to_mosear_fast") is not None:
                    extra.append(f"{t['ratio_to_mosear_fast']:.2f}x the time of {FAST}")
                cells.append(f"{name} {value}" + (f" ({', '.join(extra)})" if extra else ""))
            lines.append(f"  {kind:7s} {where:14s} " + " | ".join(cells))
    for t in result.get("targets", []):
        state = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(f"  target  {state:6s} {t['name']}: {_fmt(t['value'])}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small", help=f"one of {tuple(presets.E2E_PRESETS)} (default cpu-small)")
    p.add_argument("--models", default=None, help="comma-separated models (default: the preset's)")
    p.add_argument("--variants", default=None, help=f"comma-separated, of {','.join(VARIANTS)} (default all)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/e2e-<preset>-<device>.json)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the mosear_compiled variant (default inductor; aot_eager "
                        "traces without code generation)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: torch's); 1 gives steadier CPU timings on a shared machine")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("python -m bench.e2e: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    def split(text):
        return [s for s in text.split(",") if s] if text else None

    if args.threads is not None:
        if args.threads < 1:
            print(f"python -m bench.e2e: error: --threads: expected a positive int, got {args.threads}",
                  file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(RESULTS, f"e2e-{args.preset}-{device.type}.json")

    def save(result):  # after every model, so a run stopped by a time limit keeps what it measured
        atomic_write_json(out, result)

    try:
        save(run(args.preset, device, models=split(args.models), variants=split(args.variants),
                 log=lambda s: print(s, flush=True), on_progress=save, compile_backend=args.compile_backend))
    except ValueError as err:
        print(f"python -m bench.e2e: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main())
