"""Human-readable forms of a CA-MER report: a Markdown summary and a bar chart (PNG)."""

from __future__ import annotations

import os

from mosear_fast.atomic import atomic_save_figure, atomic_write_text

from .camer import SUBSETS

METRICS = ("accuracy", "recall", "mean")
_TITLES = {"video_aligned": "video-aligned", "audio_aligned": "audio-aligned", "consistent": "consistent"}
MAX_LISTED_PROBLEMS = 50  # the Markdown lists this many; report.json keeps them all


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def render_markdown(report: dict, *, title: str = "CA-MER evaluation") -> str:
    """The report as Markdown: subset table (percent), conflict gap, attention shares, problems."""
    lines = [
        f"# {title}",
        "",
        "| subset | n | accuracy (%) | recall (%) | mean (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in SUBSETS:
        m = report["subsets"][s]
        lines.append(
            f"| {_TITLES[s]} | {m['n']} | {_pct(m['accuracy'])} | {_pct(m['recall'])} | {_pct(m['mean'])} |"
        )
    gap = report["conflict_gap"]
    gap_text = "n/a (an aligned subset is empty)" if gap is None else f"{100 * gap:+.2f} points"
    lines += [
        "",
        f"Conflict gap (audio-aligned minus video-aligned accuracy): {gap_text}. "
        "Positive: the model follows audio when audio and video disagree.",
        f"Excluded by the protocol (no subset): {report['excluded']} samples.",
    ]
    shares = report.get("attention_share")
    if shares:
        modalities = sorted({m for s in SUBSETS for m in (shares[s] or {})})
        lines += [
            "",
            "## Mean attention share per modality",
            "",
            "| subset | " + " | ".join(modalities) + " |",
            "|---|" + "---:|" * len(modalities),
        ]
        for s in SUBSETS:
            row = shares[s] or {}
            lines.append(
                f"| {_TITLES[s]} | "
                + " | ".join(f"{row[m]:.3f}" if m in row else "n/a" for m in modalities)
                + " |"
            )
    problems = report.get("problems", [])
    lines += ["", "## Problems", ""]
    if not problems:
        lines.append("None.")
    else:
        counts = ", ".join(f"{kind}: {n}" for kind, n in report["problem_counts"].items())
        lines += [
            f"{len(problems)} rows reported ({counts}).",
            "",
            "| kind | file | line | id | detail |",
            "|---|---|---:|---|---|",
        ]
        for p in problems[:MAX_LISTED_PROBLEMS]:
            detail = str(p["detail"]).replace("|", "\\|")
            row_id = "" if p["id"] is None else str(p["id"]).replace("|", "\\|")
            lines.append(f"| {p['kind']} | {p['source']} | {p['line'] or ''} | {row_id} | {detail} |")
        if len(problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"\n... and {len(problems) - MAX_LISTED_PROBLEMS} more (all are in report.json).")
    return "\n".join(lines) + "\n"


def write_markdown(path: str | os.PathLike, report: dict, **kwargs) -> None:
    """Write :func:`render_markdown` to ``path`` atomically."""
    atomic_write_text(path, render_markdown(report, **kwargs))


def write_chart(path: str | os.PathLike, report: dict, *, title: str = "CA-MER evaluation") -> None:
    """Grouped bars of accuracy, recall and mean per subset (PNG, Agg backend), written atomically.

    Empty subsets get no bars and an "n = 0" note. With attention shares, a second panel stacks
    the mean share per modality for each subset. Every text (the title, modality names from the
    input) is drawn as plain text: ``$`` is a dollar sign, not the start of matplotlib mathtext.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe to call before pyplot is imported

    # Text objects read the setting when created, so the whole figure is built inside the context.
    with matplotlib.rc_context({"text.parse_math": False}):
        fig = _chart_figure(report, title)
    atomic_save_figure(fig, path, dpi=120)


def _chart_figure(report: dict, title: str):
    import matplotlib.pyplot as plt

    shares = report.get("attention_share")
    fig, axes = plt.subplots(1, 2 if shares else 1, figsize=(11 if shares else 6.5, 4), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(METRICS)
    for j, metric in enumerate(METRICS):
        xs, heights = [], []
        for i, s in enumerate(SUBSETS):
            value = report["subsets"][s][metric]
            if value is not None:
                xs.append(i + (j - 1) * width)
                heights.append(100 * value)
        bars = ax.bar(xs, heights, width, label=metric)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    for i, s in enumerate(SUBSETS):
        if report["subsets"][s]["n"] == 0:
            ax.text(i, 5, "n = 0", ha="center", fontsize=9, color="gray")
    ax.set_xticks(range(len(SUBSETS)), [f"{_TITLES[s]}\n(n = {report['subsets'][s]['n']})" for s in SUBSETS])
    ax.set_ylim(0, 120)  # headroom above 100 for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("percent")
    gap = report["conflict_gap"]
    ax.set_title(title + ("" if gap is None else f"  (conflict gap {100 * gap:+.1f})"), fontsize=10)
    ax.legend(loc="upper center", ncol=len(METRICS), fontsize=8)
    if shares:
        ax2 = axes[0][1]
        modalities = sorted({m for s in SUBSETS for m in (shares[s] or {})})
        bottom = [0.0] * len(SUBSETS)
        for m in modalities:
            values = [(shares[s] or {}).get(m, 0.0) for s in SUBSETS]
            ax2.bar(range(len(SUBSETS)), values, 0.6, bottom=bottom, label=m)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax2.set_xticks(range(len(SUBSETS)), [_TITLES[s] for s in SUBSETS])
        ax2.set_ylabel("mean attention share")
        ax2.set_title("attention share per modality", fontsize=10)
        ax2.set_ylim(0, 1.2)  # headroom for the legend
        ax2.legend(loc="upper center", ncol=max(1, len(modalities)), fontsize=8)
    fig.tight_layout()
    return fig
