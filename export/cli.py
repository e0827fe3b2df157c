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

Exit status: 0 exported; 1 validation failed (a shape or output-name mismatch, a runtime failure,
or with --strict a tolerance miss); 2 unusable arguments, source or output folder. Errors are one line
on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

PROG = "mosear-export"


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
    p.add_argument("--strict", action="store_true", help="a tolerance miss fails the export (else it is reported)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def _error(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .pipeline import ExportFailed, export

    try:
        report = export(args.source, args.out, format=args.format, dtype=args.dtype, opset=args.opset,
                        batch=args.batch, seq=args.seq, atol=args.atol, rtol=args.rtol, strict=args.strict,
                        overwrite=args.overwrite, adapter=args.adapter, trt_version=args.trt_version)
    except ExportFailed as err:
        return _error(str(err), 1)
    except (ValueError, TypeError, OSError, RuntimeError, NotImplementedError) as err:
        return _error(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__, 2)
    _print_summary(report, args.out)
    return 0


def _print_summary(report: dict, out: str) -> None:
    validation = report["validation"]
    print(f"Exported {report['source']} to {out} ({report['dtype']}, opset {report['opset']}): "
          f"{', '.join(report['files'])}")
    for entry in validation["shapes"]:
        for name, o in entry["outputs"].items():
            status = "ok" if o["pass"] else "MISS"
            detail = o["reason"] if "reason" in o else (f"rel error {o['rel_error']:.2e}, "
                                                         f"max abs {o['max_abs_diff']:.2e}")
            print(f"  {entry['shape']:>3} ({entry['batch']}, {entry['seq']}) {name}: {detail} {status}")
    if not validation["pass"]:
        print(f"  not validated within rel error {validation['tolerance']['rel_error_max']:.0e} "
              "(reported only; --strict fails on it)")
    lint = report["tensorrt_lint"]
    print(f"TensorRT {lint['version']} lint: "
          + ("no problems" if lint["buildable"] else f"{len(lint['problems'])} problem(s), see report.json"))
    lat = report["latency"]
    ort = f"{lat['onnxruntime_ms']:.2f} ms ({lat['onnxruntime_provider']})" if lat["onnxruntime_ms"] else "not run"
    print(f"Latency ({lat['batch']}, {lat['seq']}): PyTorch {lat['pytorch_ms']:.2f} ms ({lat['pytorch_device']}), "
          f"onnxruntime {ort}")
    if "tensorrt" in report:
        print(f"TensorRT engine: {report['tensorrt']['latency_ms']:.2f} ms on {report['tensorrt']['device']}")


if __name__ == "__main__":
    sys.exit(main())
