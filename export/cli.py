"""``mosear-export``: a MoSEAR model to ONNX (and a TensorRT engine), validated against PyTorch.

    mosear-export demo --out exported/
    mosear-export demo-output/mose --out exported/ --dtype fp16
    mosear-export path/to/hf_model --adapter path/to/mose_adapter --out exported/

SOURCE is one of:

  demo           the built-in default model, the one mosear-demo trains: the audio-visual LM
                 (mosear_fast.av_model) with the demo's MoSE adapters and AR, weights drawn from a seed
  FOLDER         a mosear-train output folder (backbone.json, adapter.safetensors, mose_config.json,
                 ar_config.json), e.g. mosear-demo's demo-output/mose/ (the trained demo model), or one
                 of its checkpoint-<step> folders
  FOLDER --adapter DIR
                 a Hugging Face causal-LM folder (config.json) with a PEFT MoSE adapter folder
                 (save_pretrained; an ar_config.json in it turns AR on)

Graph inputs. The audio-visual model (demo, mosear-train folders): input_ids (batch, seq) int64 with
the visual/audio placeholder tokens, visual (batch, Nv, Fv) and audio (batch, Na, Fa) float32
features, attention_mask (batch, seq) int64; the modality ids are derived in the graph from the
placeholders. Nv and Na are fixed by the model; seq (the text around them, and left padding) may
vary, from Nv + Na up. A Hugging Face model: input_ids, attention_mask, modality_ids, each
(batch, seq) int64. Output: logits (batch, seq, vocab). export_config.json lists every input with its
dtype, shape (named dynamic axes) and valid values.

--with-past writes a decoder with a KV cache instead (prefill with an empty past, then decode):
past_key_values.{i}.key/value in, present.{i}.key/value out (optimum's names), plus
past_modality_ids in and present_modality_ids out (AR needs the cached tokens' modality ids; they
are fed back like the cache); attention_mask then covers cached + new tokens. The report adds a
greedy 16-token decode with onnxruntime against PyTorch generate on the same prompts, and prefill
and per-token decode latency. Run it with mosear-generate DIR or mosear_fast.export.OnnxGenerator.

--ops fused writes each MoSE and AR use as one custom node (mosear.MoSELoRA, mosear.ARAttention) for
TensorRT's plugins; onnxruntime validates it through onnxruntime-extensions' Python custom ops.

Validation compares non-padding positions only, against the float32 PyTorch model for every dtype.

Exit status: 0 exported and validated; 1 validation failed (a shape or output-name mismatch, a runtime
failure, or with --strict a tolerance miss; nothing is written); 2 unusable arguments, source or
output folder (nothing is written); 3 exported but not validated: onnxruntime cannot run the graph
here (bf16 on the CPU provider); the folder is written, the report says "not validated", and
--allow-unvalidated turns this status into 0. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

PROG = "mosear-export"
EXIT_NOT_VALIDATED = 3


def build_parser() -> argparse.ArgumentParser:
    from .graph import DEFAULT_OPSET, DTYPES
    from .pipeline import FORMATS
    from .shapes import DEFAULT_BATCH
    from .sources import CAUSAL_LM_SEQ

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="'demo' (the built-in model the demo trains), a mosear-train "
                   "output folder, or a Hugging Face model folder together with --adapter")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--adapter", metavar="DIR", help="MoSE adapter folder (PEFT save_pretrained) for a HF SOURCE")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="what to write (default onnx)")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="weights and activations (default fp32)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, 18-24 (default {DEFAULT_OPSET})")
    p.add_argument("--batch", default=DEFAULT_BATCH, metavar="MIN:OPT:MAX",
                   help=f"batch sizes the graph accepts (default {DEFAULT_BATCH})")
    p.add_argument("--seq", default=None, metavar="MIN:OPT:MAX",
                   help="sequence lengths the graph accepts (default: the source's; the audio-visual model: "
                   "Nv+Na+1 : its standard prompt length : 128, 34:40:128 for demo; a Hugging Face model: "
                   f"{CAUSAL_LM_SEQ})")
    p.add_argument("--atol", type=float, help="bound on the largest elementwise |onnx - torch| (default: unchecked)")
    p.add_argument("--rtol", type=float, help="bound on ||onnx - torch|| / ||torch|| (default: the dtype's "
                   "tolerance, fp32 1e-5, fp16 5e-3, bf16 1e-2)")
    p.add_argument("--trt-version", help="TensorRT version the lint checks against (default: installed, else 10.15)")
    p.add_argument("--with-past", action="store_true", help="a decoder with a KV cache (prefill and decode) "
                   "instead of the prefill-only graph")
    p.add_argument("--past", default=None, metavar="MIN:OPT:MAX", help="cached tokens the --with-past decoder "
                   "accepts, MIN may be 0 (default 0 : seq OPT : seq MAX)")
    p.add_argument("--ops", default="static", choices=("static", "fused"), help="static: standard ONNX ops "
                   "(default); fused: one mosear.MoSELoRA / mosear.ARAttention custom node per use (TensorRT plugins)")
    p.add_argument("--strict", action="store_true", help="a tolerance miss fails the export (else it is reported)")
    p.add_argument("--allow-unvalidated", action="store_true", help=f"exit 0, not {EXIT_NOT_VALIDATED}, when the "
                   "graph cannot be validated here (bf16 on onnxruntime's CPU provider)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def _error(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .pipeline import ExportFailed, export
    from .report import NOT_VALIDATED

    try:
        report = export(args.source, args.out, format=args.format, dtype=args.dtype, opset=args.opset,
                        batch=args.batch, seq=args.seq, atol=args.atol, rtol=args.rtol, strict=args.strict,
                        overwrite=args.overwrite, adapter=args.adapter, trt_version=args.trt_version,
                        with_past=args.with_past, past=args.past, ops=args.ops)
    except ExportFailed as err:
        return _error(str(err), 1)
    except (ValueError, TypeError, OSError, RuntimeError, NotImplementedError) as err:
        return _error(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__, 2)
    _print_summary(report, args.out)
    if report["validation"]["status"] == NOT_VALIDATED and not args.allow_unvalidated:
        print(f"{PROG}: {args.out} is written but NOT VALIDATED: {_not_run_reason(report)}; pass --allow-unvalidated "
              f"to accept it (exit status {EXIT_NOT_VALIDATED})", file=sys.stderr)
        return EXIT_NOT_VALIDATED
    return 0


def _not_run_reason(report: dict) -> str:
    for entry in report["validation"]["shapes"]:
        for o in entry["outputs"].values():
            if o.get("reason"):
                return o["reason"]
    return "onnxruntime cannot run the graph here"


def _print_summary(report: dict, out: str) -> None:
    validation = report["validation"]
    kind = "decoder with KV cache" if report.get("with_past") else "prefill graph"
    print(f"Exported {report['source']} to {out} ({kind}, {report['dtype']}, opset {report['opset']}, "
          f"ops {report.get('ops', 'static')}): {', '.join(report['files'])}")
    for entry in validation["shapes"]:
        shape = f"({entry['batch']}, {entry['seq']}" + (f", past {entry['past']})" if "past" in entry else ")")
        for name, o in entry["outputs"].items():
            status = "ok" if o["pass"] else ("not run" if o.get("not_run") else "MISS")
            detail = o["reason"] if "reason" in o else (f"rel error {o['rel_error']:.2e}, "
                                                         f"max abs {o['max_abs_diff']:.2e}")
            print(f"  {entry['shape']:>11} {shape} {name}: {detail} {status}")
    print(f"Validation: {validation['status']} (against the {validation['reference']}, "
          f"{validation['compared']}, rel error <= {validation['tolerance']['rel_error_max']:.0e})")
    if validation["status"] == "failed" and not validation["strict"]:
        print("  (reported only; --strict fails on it)")
    check = report.get("decode_check")
    if check is not None and "tokens_equal" in check:
        print(f"Greedy decode, {check['new_tokens']} tokens, batch {check['batch']}: {check['tokens_equal']}/"
              f"{check['new_tokens']} steps equal to PyTorch generate, max step logits rel error "
              f"{check['max_step_rel_error']:.2e} {'ok' if check['pass'] else 'MISS'}")
    elif check is not None:
        print(f"Greedy decode: {check['status']} ({check['reason']})")
    lint = report["tensorrt_lint"]
    print(f"TensorRT {lint['version']} lint: "
          + ("no problems" if lint["buildable"] else f"{len(lint['problems'])} problem(s), see report.json"))
    lat = report["latency"]

    def ort(ms):
        return f"{ms:.2f} ms ({lat['onnxruntime_provider']})" if ms else "not run"

    if "prefill" in lat:
        for phase in ("prefill", "decode"):
            p = lat[phase]
            print(f"Latency {phase} (batch {lat['batch']}, {p['seq']} new, {p['past']} cached): PyTorch "
                  f"{p['pytorch_ms']:.2f} ms ({lat['pytorch_device']}), onnxruntime {ort(p['onnxruntime_ms'])}")
    else:
        print(f"Latency ({lat['batch']}, {lat['seq']}): PyTorch {lat['pytorch_ms']:.2f} ms ({lat['pytorch_device']}), "
              f"onnxruntime {ort(lat['onnxruntime_ms'])}")
    if "tensorrt" in report:
        print(f"TensorRT engine: {report['tensorrt']['latency_ms']:.2f} ms on {report['tensorrt']['device']}")


if __name__ == "__main__":
    sys.exit(main())
