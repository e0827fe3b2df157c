"""``mosear-predict``: predictions of a trained model for ``mosear-eval``.

    mosear-predict OUT --data rows.jsonl --out predictions.jsonl [--labels happy,sad,...]
                   [--label-score sum|mean] [--max-new-tokens N] [--batch-size N] [--no-ar]

``OUT`` is a ``mosear-train`` output folder (or one of its checkpoints), loaded with ``load_trained``
(MoSE with the dynamic weights as trained, and AR when the folder has an AR config, unless
``--no-ar``). Each row of ``--data`` gives a prompt: the rows of ``mosear-train`` for a Hugging Face
model (``token_rows``: ``{"id", "prompt"}``, or ``{"id", "input_ids", "modality_ids"?}`` where the
tokens before the first label that is not -100 are the prompt; answers are ignored, so the training
file itself works), or for the built-in audio-visual LM a manifest (``data.py``).

- ``--labels happy,sad,...``: classification. The prediction is the label whose answer scores highest
  after the prompt. A label's answer is what ``mosear-train`` would train on for it: its tokens (the
  tokenizer's, no special tokens) followed by EOS. Its score is the sum of the log-probabilities of
  those tokens (``--label-score sum``, the default: the log-likelihood of exactly that answer, which
  compares labels of different token counts as the model's own probabilities do) or their mean
  (``--label-score mean``: per-token, so long labels are not penalised for their length). Each
  forward scores ``--batch-size`` rows against every label (batch size x labels sequences).
- without ``--labels``: greedy generation of up to ``--max-new-tokens`` tokens, decoded with the
  tokenizer (special tokens dropped, whitespace stripped).
- the built-in audio-visual LM answers with one emotion token: the prediction is the highest-scoring
  of ``--labels`` (default: all nine emotions), by the log-probability of its token.

Writes ``{"id", "prediction"}`` per row (plus ``"scores": {label: score}`` with labels), the format
``mosear-eval --predictions`` reads; the file is written atomically when every row is done.
Exit status: 0 done; 2 unusable input or output (one-line message, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "mosear-predict"
LABEL_SCORES = ("sum", "mean")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, metavar="OUT", help="a mosear-train output folder (or a checkpoint in it)")
    p.add_argument("--data", type=Path, required=True, metavar="FILE.jsonl",
                   help="rows to predict: token rows (Hugging Face base) or a manifest (built-in model)")
    p.add_argument("--out", type=Path, required=True, metavar="PREDICTIONS.jsonl",
                   help='where to write {"id", "prediction"} rows for mosear-eval --predictions')
    p.add_argument("--labels", metavar="A,B,...", help="comma-separated labels: classify by the highest-scoring "
                   "label instead of generating")
    p.add_argument("--label-score", choices=LABEL_SCORES, default="sum",
                   help="how a label's token log-probabilities combine: sum (default) or mean")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N",
                   help="tokens to generate per row without --labels (default 16)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="rows per forward pass (default 8)")
    p.add_argument("--no-ar", action="store_true", help="leave AR off even when the folder has an AR config")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_label_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    labels = [label.strip() for label in text.split(",") if label.strip()]
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"--labels: expected distinct comma-separated labels, got {text!r}")
    return labels


def check_args(args) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: expected a positive integer, got {args.max_new_tokens}")
    if not args.data.is_file():
        raise ValueError(f"--data: {args.data} is not a file")
    if args.out.exists() and not args.out.is_file():
        raise ValueError(f"--out: {args.out} exists and is not a file")
    if not args.folder.is_dir():
        raise ValueError(f"OUT: {args.folder} is not a folder; expected a mosear-train output folder")


def batches(items, size: int, progress: bool):
    from tqdm.auto import tqdm

    starts = range(0, len(items), size)
    for start in tqdm(starts, desc="predicting", unit="batch", disable=not progress):
        yield items[start:start + size]


def run(args) -> int:
    import torch

    from mosear_fast.base_model import HF_FORMAT
    from mosear_fast.trained import BACKBONE_FILE, load_trained, read_json

    from .jsonl import write_jsonl

    check_args(args)
    labels = parse_label_list(args.labels)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reference = read_json(args.folder, BACKBONE_FILE)
    model = load_trained(args.folder, ar=not args.no_ar).to(device)
    progress = not args.no_progress
    with torch.no_grad():
        if isinstance(reference, dict) and reference.get("format") == HF_FORMAT:
            rows = predict_hf(model, Path(reference["path"]), args, labels, device, progress)
        else:
            rows = predict_builtin(model, args, labels, device, progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out, rows)
    return len(rows)


def predict_hf(model, base_folder: Path, args, labels, device, progress) -> list[dict]:
    from mosear_fast.base_model import has_tokenizer, load_tokenizer

    from .scoring import generate_answers, score_labels
    from .token_rows import TokenRows, TokenRowsCollator, encode_answer, forward_arguments

    if not has_tokenizer(base_folder):
        raise ValueError(f"OUT: its base model {base_folder} has no tokenizer, which mosear-predict needs to "
                         "encode labels and decode answers")
    tokenizer = load_tokenizer(base_folder)
    context = model._mosear_context
    rows = TokenRows(args.data, tokenizer=tokenizer, vocab_size=model.get_input_embeddings().num_embeddings,
                     num_modalities=context.num_modalities, training=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collator = TokenRowsCollator(pad_id=pad_id, placeholders=context.placeholder_tokens,
                                 forward_arguments=forward_arguments(model), training=False)
    out = []
    if labels is not None:
        answers = [encode_answer(tokenizer, label) for label in labels]
        empty = [label for label, ids in zip(labels, answers, strict=True) if not ids]
        if empty:
            raise ValueError(f"--labels: {empty[0]!r} has no tokens")
        for batch in batches(rows.examples, args.batch_size, progress):
            scores = score_labels(model, collator, batch, answers, reduce=args.label_score, device=device)
            for example, row_scores in zip(batch, scores.tolist(), strict=True):
                best = max(range(len(labels)), key=row_scores.__getitem__)
                out.append({"id": example.id, "prediction": labels[best],
                            "scores": {label: round(s, 6) for label, s in zip(labels, row_scores, strict=True)}})
        return out
    for batch in batches(rows.examples, args.batch_size, progress):
        texts = generate_answers(model, tokenizer, collator, batch, max_new_tokens=args.max_new_tokens, device=device)
        out.extend({"id": example.id, "prediction": text} for example, text in zip(batch, texts, strict=True))
    return out


def predict_builtin(model, args, labels, device, progress) -> list[dict]:
    import torch

    from mosear_fast.av_model import FIRST_EMOTION_ID

    from .av_batches import AVCollator
    from .data import ManifestDataset
    from .labels import EMOTIONS, normalize_label

    try:
        names = list(EMOTIONS) if labels is None else [normalize_label(label) for label in labels]
    except ValueError as e:
        raise ValueError(f"--labels: {e}") from None
    tokens = torch.tensor([FIRST_EMOTION_ID + EMOTIONS.index(name) for name in names], device=device)
    dataset = ManifestDataset(args.data, modalities=("visual", "audio"))
    collate = AVCollator(with_answers=False)
    out = []
    indices = list(range(len(dataset)))
    for batch in batches(indices, args.batch_size, progress):
        items = [dataset[i] for i in batch]
        inputs = {k: v.to(device) for k, v in collate(items).items()}
        log_probs = model(**inputs).logits[:, -1].float().log_softmax(-1)[:, tokens]  # [B, labels]
        for item, row_scores in zip(items, log_probs.tolist(), strict=True):
            best = max(range(len(names)), key=row_scores.__getitem__)
            out.append({"id": item["id"], "prediction": names[best],
                        "scores": {name: round(s, 6) for name, s in zip(names, row_scores, strict=True)}})
    return out


def main(argv=None) -> int:
    from .train_cli import describe

    args = build_parser().parse_args(argv)
    try:
        from mosear_fast.base_model import transformers_progress

        with transformers_progress(not args.no_progress):
            n = run(args)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {describe(e)}", file=sys.stderr)
        return 2
    print(f"wrote {n} predictions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
