"""``mosear-generate``: greedy generation with a ``mosear-export --with-past`` folder (onnxruntime).

    mosear-generate exported/ --random-features 0            # the demo export's standard prompt
    mosear-generate exported/ --input-ids 1,5,6,7 --modality-ids 0,0,1,2 --max-new-tokens 8
    mosear-generate exported/ --prompt "hello there"           # a folder with tokenizer files

The prompt: --input-ids (comma-separated token ids; ';' between prompts of a batch, left padded),
or --prompt TEXT (tokenised with the tokenizer files mosear-export copied into DIR), or, for the
audio-visual model, its standard prompt from export_config.json when neither is given. Modality
ids (causal-LM exports): --modality-ids in the same layout (default: text). The audio-visual
model's visual/audio features: --features FILE.safetensors (tensors named like the graph's inputs,
batch first) or --random-features SEED (standard normal, for a quick look).

Prints one JSON line per prompt: {"prompt": i, "tokens": [...]} (plus "text" with a tokenizer).
Progress goes to stderr. Exit status: 0 done; 2 unusable folder or input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PROG = "mosear-generate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="DIR", help="a mosear-export --with-past output folder")
    p.add_argument("--input-ids", metavar="IDS", help="prompt token ids: 1,2,3 (';' separates prompts)")
    p.add_argument("--prompt", metavar="TEXT", action="append", help="prompt text (needs tokenizer files in DIR); "
                   "repeat for a batch")
    p.add_argument("--modality-ids", metavar="IDS", help="modality ids like --input-ids (causal-LM exports; "
                   "default text)")
    p.add_argument("--features", metavar="FILE", help="safetensors file with the feature inputs (audio-visual model)")
    p.add_argument("--random-features", type=int, metavar="SEED", help="standard-normal feature inputs drawn "
                   "from SEED (audio-visual model)")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="tokens to generate (default 16)")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the model's EOS token")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="onnxruntime provider (default: CUDA when available, else CPU)")
    return p


def _parse_rows(text: str, option: str) -> list[list[int]]:
    try:
        rows = [[int(v) for v in row.split(",") if v.strip()] for row in text.split(";")]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated ints (';' between prompts), got {text!r}") from None
    if not rows or any(not row for row in rows):
        raise ValueError(f"{option}: expected at least one id per prompt, got {text!r}")
    return rows


def left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask) (B, max length): rows right-aligned, padding on the left."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def _tokenizer(folder: Path):
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _prompt(args, generator, tokenizer):
    pad = generator.plan.pad_token_id or 0
    if args.input_ids and args.prompt:
        raise ValueError("--input-ids, --prompt: give one of them")
    if args.prompt:
        if tokenizer is None:
            raise ValueError(f"--prompt: {args.folder} has no tokenizer files; pass --input-ids")
        rows = [tokenizer(text)["input_ids"] for text in args.prompt]
    elif args.input_ids:
        rows = _parse_rows(args.input_ids, "--input-ids")
    else:
        prompt = generator.config.get("interface", {}).get("prompt", {}).get("standard_prompt_ids")
        if prompt is None:
            raise ValueError("--input-ids: this export has no standard prompt; pass --input-ids or --prompt")
        rows = [prompt]
    ids, mask = left_pad(rows, pad)
    modality = None
    if args.modality_ids:
        modality_rows = _parse_rows(args.modality_ids, "--modality-ids")
        if [len(r) for r in modality_rows] != [len(r) for r in rows]:
            raise ValueError("--modality-ids: expected one id per prompt token, in the --input-ids layout")
        modality, _ = left_pad(modality_rows, -1)
    return ids, mask, modality


def _features(args, generator, batch: int) -> dict:
    names = generator.plan.feature_inputs
    if not names:
        if args.features or args.random_features is not None:
            raise ValueError("--features: this export takes no feature inputs")
        return {}
    if args.features:
        from mosear_fast.trained import read_safetensors

        tensors = read_safetensors(args.features, f"the feature inputs {list(names)}")
        return {name: tensors[name].float().numpy() for name in names if name in tensors}
    if args.random_features is None:
        raise ValueError(f"--features: this export needs {list(names)}; pass --features FILE or --random-features "
                         "SEED")
    inputs = {i["name"]: i for i in generator.config["inputs"]}
    rng = np.random.default_rng(args.random_features)
    return {name: rng.standard_normal((batch, *inputs[name]["shape"][1:])).astype(np.float32) for name in names}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .generate import GeneratorError, OnnxGenerator

    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens: expected an int >= 1, got {args.max_new_tokens}")
        providers = {"auto": None, "cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}[args.provider]
        generator = OnnxGenerator(args.folder, providers=providers)
        tokenizer = _tokenizer(Path(args.folder))
        ids, mask, modality = _prompt(args, generator, tokenizer)
        features = _features(args, generator, ids.shape[0])
        from tqdm import tqdm

        with tqdm(total=args.max_new_tokens, desc=f"{PROG} ({generator.provider})", unit="token",
                  file=sys.stderr, disable=None) as bar:
            tokens = generator.generate(ids, modality, mask, max_new_tokens=args.max_new_tokens,
                                        eos_token_id=None if args.no_eos else "model",
                                        progress=lambda _: bar.update(1), **features)
    except (GeneratorError, ValueError, KeyError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    for i, row in enumerate(tokens.tolist()):
        line = {"prompt": i, "tokens": row}
        if tokenizer is not None:
            line["text"] = tokenizer.decode(row, skip_special_tokens=True)
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
