"""``mosear-eval``: score predictions on CA-MER (or any audio/video/multimodal-labelled set).

    mosear-eval --labels labels.jsonl --predictions predictions.jsonl --out results/

Writes ``report.json`` (machine-readable), ``report.md`` and ``camer.png`` into ``--out`` as one unit:
all three are written into a staging folder first and moved into ``--out`` only when every one is
complete, so a failed run leaves nothing of itself and a previous report stays as it was. Prints a
summary and every kind of problem found in the inputs.
Exit status: 0 done; 1 done but problems were found and ``--strict`` was given; 2 unusable input
or output (one-line message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mosear_fast.atomic import atomic_write_text, staged_folder

from .camer import SUBSETS
from .camer_report import write_chart, write_markdown
from .camer_rows import LABELS, PREDICTIONS, evaluate_rows
from .jsonl import JsonlError, read_jsonl
from .labels import EMOTIONS

PROG = "mosear-eval"
PROGRESS_MIN_ROWS = 2000  # below this, scoring is instant and a bar is noise
REPORT_JSON, REPORT_MD, CHART_PNG = "report.json", "report.md", "camer.png"
EXAMPLES_PRINTED = 5  # per problem kind on the terminal; report.json has them all


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Score emotion predictions with the CA-MER protocol: video-aligned, audio-aligned and "
        "consistent subsets, label-set accuracy |P∩G|/|P| and recall |P∩G|/|G|, their mean, and the "
        "conflict gap (audio-aligned minus video-aligned accuracy).",
        epilog=f"Labels: {', '.join(EMOTIONS)} and synonyms (e.g. anger, joy, anxious, scared). "
        "Rows with unknown or duplicate ids, missing predictions or unparsable labels are listed under "
        "'problems' in report.json and printed; missing and unparsable predictions score 0. "
        "Exit status: 0 done, 1 problems found with --strict, 2 unusable input or output.",
    )
    parser.add_argument(
        "--labels",
        required=True,
        type=Path,
        metavar="L.jsonl",
        help='JSONL, one row per sample: {"id", "label", "audio_label", "video_label"}; each '
        "label a name or a list of names (the multimodal truth is 'label'). Extra keys are "
        "ignored, so a dataset manifest works.",
    )
    parser.add_argument(
        "--predictions",
        required=True,
        type=Path,
        metavar="P.jsonl",
        help='JSONL, one row per sample: {"id", "prediction"}, prediction free text or a list of '
        'strings; optional "attention": {modality: share} is averaged per subset.',
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help=f"output folder (created if missing) for {REPORT_JSON}, {REPORT_MD} and {CHART_PNG}.",
    )
    parser.add_argument(
        "--title", default="CA-MER evaluation", help="title of the Markdown report and the chart."
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any problem is found.")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help=f"never show the progress bar (shown from {PROGRESS_MIN_ROWS} label rows).",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors.")
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _print_summary(report: dict, out_dir: Path, files: dict[str, Path]) -> None:
    print(f"{'subset':<15}{'n':>7}{'accuracy':>11}{'recall':>9}{'mean':>9}")
    for s in SUBSETS:
        m = report["subsets"][s]
        cells = ["n/a" if m[k] is None else f"{100 * m[k]:.2f}" for k in ("accuracy", "recall", "mean")]
        print(f"{s:<15}{m['n']:>7}{cells[0]:>11}{cells[1]:>9}{cells[2]:>9}")
    gap = report["conflict_gap"]
    print(f"conflict gap: {'n/a' if gap is None else f'{100 * gap:+.2f}'}   excluded: {report['excluded']}")
    for kind, count in report["problem_counts"].items():
        examples = [p for p in report["problems"] if p["kind"] == kind][:EXAMPLES_PRINTED]
        print(f"problem {kind}: {count} row(s)")
        for p in examples:
            source = files.get(p["source"], p["source"])
            where = f"{source}:{p['line']}" if p["line"] else source
            print(f"  {where} id={p['id']!r}: {p['detail']}")
        if count > len(examples):
            print(f"  ... {count - len(examples)} more in {out_dir / REPORT_JSON}")
    print(f"wrote {out_dir / REPORT_JSON}, {out_dir / REPORT_MD}, {out_dir / CHART_PNG}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (also used as ``sys.exit`` status by the entry point)."""
    args = build_parser().parse_args(argv)
    try:
        label_rows = read_jsonl(args.labels)
        prediction_rows = read_jsonl(args.predictions)
    except JsonlError as e:
        return _fail(f"cannot read input: {e}")
    if args.out.exists() and not args.out.is_dir():
        return _fail(f"--out {args.out}: exists and is not a folder")

    progress = not args.no_progress and not args.quiet and len(label_rows) >= PROGRESS_MIN_ROWS
    report = evaluate_rows(label_rows, prediction_rows, progress=progress)
    report["inputs"] = {"labels": str(args.labels), "predictions": str(args.predictions)}
    try:  # strict JSON: a NaN or Infinity would make report.json unreadable to other tools
        report_text = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError as e:
        return _fail(f"cannot write {REPORT_JSON}: the report holds a non-finite number ({e})")
    try:
        # report.json is the completion marker: it moves into --out last.
        with staged_folder(args.out, last=(REPORT_JSON,)) as stage:
            write_chart(stage / CHART_PNG, report, title=args.title)
            write_markdown(stage / REPORT_MD, report, title=args.title)
            atomic_write_text(stage / REPORT_JSON, report_text)
    except OSError as e:
        return _fail(f"cannot write to --out {args.out}: {e.strerror or e}")
    if not args.quiet:
        _print_summary(report, args.out, {LABELS: args.labels, PREDICTIONS: args.predictions})
    return 1 if args.strict and report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
