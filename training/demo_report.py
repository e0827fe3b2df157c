"""The demo's results as a terminal/Markdown table, ``results.json`` and a chart (``demo.png``)."""

from __future__ import annotations

import json
from pathlib import Path

from mosear_fast.atomic import atomic_save_figure, atomic_write_text

from .camer import AUDIO_ALIGNED, CONSISTENT, VIDEO_ALIGNED

COLUMNS = (("video-al.", VIDEO_ALIGNED), ("audio-al.", AUDIO_ALIGNED), ("consist.", CONSISTENT))


def _mean_share(report: dict, modality: str) -> float | None:
    """The share of ``modality`` averaged over the three subsets (None without AR measurements)."""
    shares = report.get("attention_share") or {}
    values = [s[modality] for s in shares.values() if s and modality in s]
    return sum(values) / len(values) if values else None


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, report in results["variants"].items():
        cells = [name]
        for _, subset in COLUMNS:
            acc = report["subsets"][subset]["accuracy"]
            cells.append("n/a" if acc is None else f"{100 * acc:.1f}")
        gap = report["conflict_gap"]
        cells.append("n/a" if gap is None else f"{100 * gap:+.1f}")
        for modality in ("visual", "audio"):
            share = _mean_share(report, modality)
            cells.append("n/a" if share is None else f"{share:.3f}")
        rows.append(cells)
    return rows


HEADER = ["variant", *(c for c, _ in COLUMNS), "gap", "visual att.", "audio att."]


def render_table(results: dict) -> str:
    """Fixed-width table: accuracy (%) per subset, conflict gap (points), mean attention shares."""
    rows = [HEADER, *table_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths,
                                                                                                strict=True)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    weights = results.get("mose_modality_weights")
    if weights:
        lines.append("MoSE dynamic modality weights at the end of fitting: "
                     + ", ".join(f"{m} {w:.3f}" for m, w in weights.items()))
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    lines = ["# mosear-demo: CA-MER on the audio-biased audio-visual LM", "",
             "Accuracy (%) per subset, conflict gap (audio-aligned minus video-aligned accuracy, points) and "
             "mean attention share of the text queries per modality (after reallocation where AR runs).", "",
             "| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    weights = results.get("mose_modality_weights")
    if weights:
        lines += ["", "MoSE dynamic modality weights at the end of fitting: "
                  + ", ".join(f"{m} {w:.3f}" for m, w in weights.items()) + "."]
    lines += ["", f"Settings: `{json.dumps(results['settings'])}`; runtime {results['runtime_s']} s."]
    return "\n".join(lines) + "\n"


def write_chart(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(results["variants"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(COLUMNS)
    for j, (label, subset) in enumerate(COLUMNS):
        values = [100 * (results["variants"][v]["subsets"][subset]["accuracy"] or 0.0) for v in variants]
        bars = ax.bar([i + (j - 1) * width for i in range(len(variants))], values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(variants)), [f"{v}\ngap {100 * results['variants'][v]['conflict_gap']:+.1f}"
                                         for v in variants])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 115)
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    ax.set_title("CA-MER accuracy per subset", fontsize=10)
    bottom = [0.0] * len(variants)
    for modality in ("text", "visual", "audio"):
        values = [_mean_share(results["variants"][v], modality) or 0.0 for v in variants]
        ax2.bar(range(len(variants)), values, 0.6, bottom=bottom, label=modality)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax2.set_xticks(range(len(variants)), variants)
    ax2.set_ylim(0, 1.2)
    ax2.set_ylabel("mean attention share")
    ax2.legend(loc="upper center", ncol=3, fontsize=8)
    ax2.set_title("attention share per modality (text queries)", fontsize=10)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def write_results(out_dir: Path, results: dict) -> None:
    """``results.md``, ``demo.png``, then ``results.json`` (last: its presence means all are complete)."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "results.md", render_markdown(results))
    write_chart(out_dir / "demo.png", results)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
