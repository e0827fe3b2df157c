"""The demo's results rendered: terminal/Markdown tables, ``demo.png``, ``tradeoff.png``, the claims.

Everything here reads a ``results.json`` (``mosear-demo``'s output); nothing is typed in by hand.
``python -m mosear_fast.training.demo_report RESULTS --write README.md`` replaces the README block
between ``<!-- demo:begin -->`` and ``<!-- demo:end -->`` and redraws both charts beside RESULTS.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mosear_fast.atomic import atomic_save_figure, atomic_write_json, atomic_write_text

from .camer import AUDIO_ALIGNED, CONSISTENT, VIDEO_ALIGNED
from .demo_stats import interval

BEGIN, END = "<!-- demo:begin -->", "<!-- demo:end -->"
COLUMNS = (("VA", VIDEO_ALIGNED), ("AA", AUDIO_ALIGNED), ("C", CONSISTENT), ("gap", "gap"), ("mean3", "mean3"))
REFERENCE_LABELS = {"bayes_optimal": "Bayes-optimal", "full_finetune": "full fine-tuning", "lora": "LoRA"}
HEADER = ["variant", *(c for c, _ in COLUMNS), "mean3 vs baseline", "visual att.", "audio att."]


def _cell(entry: dict, metric: str, *, signed: bool = False) -> str:
    mean = entry[metric]
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    ci = entry.get("ci95", {}).get(metric)
    return f"{text} ± {(ci[1] - ci[0]) / 2:.1f}" if ci else text


def _diff_cell(entry: dict, metric: str = "mean3") -> str:
    diff = entry.get("vs_baseline", {}).get(metric)
    if diff is None:
        return ""
    text = f"{diff['mean']:+.1f}"
    if "ci95" in diff:
        text += f" ± {(diff['ci95'][1] - diff['ci95'][0]) / 2:.1f}"
    return text


def _label(name: str, results: dict) -> str:
    if name == "lora":
        ranks = sorted({c["lora_rank"] for c in results.get("choices", []) if "lora_rank" in c})
        return f"LoRA (r={'/'.join(map(str, ranks))})" if ranks else "LoRA"
    return REFERENCE_LABELS.get(name, name)


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for group in ("variants", "references"):
        for name, entry in results[group].items():
            shares = entry.get("attention_share") or {}
            cells = [_label(name, results)]
            cells += [_cell(entry, metric, signed=metric == "gap") for _, metric in COLUMNS]
            cells.append("" if name == "baseline" else _diff_cell(entry))
            cells += [f"{shares[m]:.3f}" if m in shares else "n/a" for m in ("visual", "audio")]
            rows.append(cells)
    return rows


def _choices_line(results: dict) -> str:
    choices = results.get("choices", [])

    def ar(c):
        return "no AR" if c["option"] == "none" else f"{c['option']} {c['strength']:g}"

    parts = [f"seed {c['seed']}: + AR {ar(c['ar'])}; MoSE r={c['mose_size'][0]} E={c['mose_size'][1]}, "
             f"epoch {c['mose_epoch']}; + MoSE + AR {ar(c['mose_ar'])}" for c in choices]
    line = "Chosen on validation: " + " | ".join(parts) + "."
    weights = results.get("mose_modality_weights")
    if weights:
        line += " MoSE dynamic modality weights at the end of fitting (mean over seeds): " + \
            ", ".join(f"{m} {w:.3f}" for m, w in weights.items()) + "."
    return line


def render_table(results: dict) -> str:
    """Fixed-width table: test accuracy (%) per subset, gap and mean3 with 95% intervals, references."""
    rows = [HEADER, *table_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(2 + len(results["variants"]), "-" * len(lines[0]))
    lines.append(_choices_line(results))
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
    for i, row in enumerate(table_rows(results)):
        name = row[0] if i < len(results["variants"]) else f"*{row[0]}*"
        lines.append("| " + " | ".join([name, *row[1:]]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- claims, in words


def _verdict(entry: dict, metric: str, direction: int) -> str:
    """'yes' when the paired difference vs baseline lies on the claimed side (interval excluding 0, or
    the mean with one seed), 'no' when on the other side, 'unresolved' when the interval holds 0."""
    diff = entry["vs_baseline"][metric]
    low, high = diff.get("ci95", (diff["mean"], diff["mean"]))
    if direction * low > 0 and direction * high > 0:
        return "yes"
    if direction * low < 0 and direction * high < 0:
        return "no"
    return "unresolved"


def _diff(entry: dict, metric: str) -> str:
    d = entry["vs_baseline"][metric]
    half = f" ± {(d['ci95'][1] - d['ci95'][0]) / 2:.1f}" if "ci95" in d else ""
    return f"{d['mean']:+.1f}{half}"


def _claim(entry: dict) -> str:
    gap_down, aa_down = _verdict(entry, "gap", -1), _verdict(entry, AUDIO_ALIGNED, -1)
    gain = _verdict(entry, "mean3", 1)
    if gap_down == "yes" and aa_down != "yes" and gain == "yes":
        return "reproduced"
    if gap_down == "yes" and aa_down == "yes":
        return "only with a trade-off (the gap narrows, audio-aligned accuracy falls" + \
            ("; mean3 still rises)" if gain == "yes" else "; no resolved mean3 gain)")
    if gap_down == "yes":
        return "partly (the gap narrows with no resolved audio-aligned loss, but no resolved mean3 gain either)"
    if gap_down == "no":
        return "no (the gap widens)"
    return "not resolved (the gap's interval holds 0)"


def _line_shift(entry: dict) -> str:
    """The paired change of VA + AA: about 0 moves along the VA + AA line, above 0 beyond it."""
    d = entry["vs_baseline"]
    per_seed = [va + aa for va, aa in zip(d[VIDEO_ALIGNED]["per_seed"], d[AUDIO_ALIGNED]["per_seed"], strict=True)]
    return _diff({"vs_baseline": {"sum": interval(per_seed)}}, "sum")


def _seeds_up(entry: dict) -> str:
    per_seed = entry["vs_baseline"]["mean3"]["per_seed"]
    return f"{sum(d > 0 for d in per_seed)} of {len(per_seed)}"


def _no_ar_note(results: dict, key: str) -> str:
    picks = [c[key]["option"] for c in results.get("choices", [])]
    if picks and all(p == "none" for p in picks):
        return " Validation chose no AR in every seed, so this row is the model without AR."
    return ""


def claims(results: dict) -> list[str]:
    """Plain sentences: which of the paper's claims the committed results reproduce, from the numbers."""
    v, refs = results["variants"], results["references"]
    n = len(v["baseline"]["per_seed"])
    how = f"paired differences against the baseline, mean ± 95% half-interval over {n} seeds" if n > 1 else \
        "one seed: no interval, read the signs with care"
    base = v["baseline"]
    out = [f"Differences are {how}; a claim counts as reproduced when its interval excludes 0 on the claimed "
           "side. \"VA + AA\" is the change of their sum: about 0 means a move along the VA + AA line (a "
           "trade), above 0 a move beyond it."]
    out.append(f"*The backbone over-relies on audio in conflicts*: reproduced by construction (gap "
               f"{_cell(base, 'gap', signed=True)} points; the backbone is trained where audio is the more reliable "
               "cue).")
    bayes = refs["bayes_optimal"]
    out.append("*Balance can win on every subset here*: the Bayes-optimal classifier reaches "
               f"VA {bayes[VIDEO_ALIGNED]:.1f}, AA {bayes[AUDIO_ALIGNED]:.1f}, C {bayes[CONSISTENT]:.1f} "
               f"(mean3 {bayes['mean3']:.1f}) against the baseline's {base[VIDEO_ALIGNED]:.1f} / "
               f"{base[AUDIO_ALIGNED]:.1f} / {base[CONSISTENT]:.1f} (mean3 {base['mean3']:.1f}).")
    for name, what, key in (("+ MoSE", "MoSE (fine-tuning, backbone frozen)", None),
                            ("+ AR", "AR (inference only)", "ar"), ("+ MoSE + AR", "MoSE with AR", "mose_ar")):
        e = v[name]
        out.append(f"*{what} reduces the audio bias without an audio/visual trade-off*: {_claim(e)}. Gap "
                   f"{_diff(e, 'gap')}, VA {_diff(e, VIDEO_ALIGNED)}, AA {_diff(e, AUDIO_ALIGNED)}, VA + AA "
                   f"{_line_shift(e)}, C {_diff(e, CONSISTENT)} (consistent samples improve: "
                   f"{_verdict(e, CONSISTENT, 1)}), mean3 {_diff(e, 'mean3')}, higher than the baseline's in "
                   f"{_seeds_up(e)} seeds." + (_no_ar_note(results, key) if key else ""))
    for name in ("full_finetune", "lora"):
        e = refs[name]
        out.append(f"Reference, {_label(name, results)} on the same fitting set: gap {_diff(e, 'gap')}, VA + AA "
                   f"{_line_shift(e)}, mean3 {_diff(e, 'mean3')}, higher in {_seeds_up(e)} seeds.")
    seeds = [s for s in results.get("per_seed", []) if "runtime_s" in s]
    if seeds:
        out.append(f"One seed took {_mean([s['runtime_s'] for s in seeds]) / 60:.1f} min of wall time and "
                   f"{_mean([s['cpu_s'] for s in seeds]) / 60:.1f} min of CPU time ({results.get('threads', '?')} "
                   "torch thread) on the machine that ran it (mean over seeds).")
    return out


def _mean(values):
    return sum(values) / len(values)


def render_markdown(results: dict, *, charts: tuple[str, str] = ("demo.png", "tradeoff.png")) -> str:
    s = results["settings"]
    lines = [
        markdown_table(results), "",
        f"Test accuracy (%) on {sum(s['test_counts'].values())} balanced samples per seed, mean ± 95% half-interval "
        f"over {s['seeds']} seed{'s' if s['seeds'] > 1 else ''}; gap = AA − VA (points); mean3 = mean of VA, AA and C; "
        "\"mean3 vs baseline\" = paired per-seed difference; attention = mean share of the text queries' attention "
        "(after reallocation; n/a where the AR option does not record it). Italic rows are references.", "",
        _choices_line(results), "",
        *[f"- {c}" for c in claims(results)], "",
        f"![accuracy per subset]({charts[0]})", "",
        f"![VA against AA accuracy as AR strength grows]({charts[1]})",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- charts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _half(entry: dict, metric: str) -> float:
    ci = entry.get("ci95", {}).get(metric)
    return (ci[1] - ci[0]) / 2 if ci else 0.0


def write_chart(path: Path, results: dict) -> None:
    """Accuracy per subset (95% intervals) for the variants and references; attention shares."""
    plt = _pyplot()
    rows = [(name, e) for name, e in results["variants"].items()] + \
        [(_label(name, results), e) for name, e in results["references"].items()]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.4), gridspec_kw={"width_ratios": [2.2, 1]})
    subsets = COLUMNS[:3]
    width = 0.8 / len(subsets)
    for j, (label, subset) in enumerate(subsets):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        values = [e[subset] for _, e in rows]
        bars = ax.bar(xs, values, width, yerr=[_half(e, subset) for _, e in rows], capsize=2, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    ax.axvline(len(results["variants"]) - 0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(rows)), [f"{n}\ngap {e['gap']:+.1f}\nmean3 {e['mean3']:.1f}" for n, e in rows], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 118)
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    ax.set_title("CA-MER accuracy per subset (VA video-aligned, AA audio-aligned, C consistent)", fontsize=10)
    variants = [(n, e) for n, e in results["variants"].items() if e.get("attention_share")]
    bottom = [0.0] * len(variants)
    for modality in ("text", "visual", "audio"):
        values = [e["attention_share"].get(modality, 0.0) for _, e in variants]
        ax2.bar(range(len(variants)), values, 0.6, bottom=bottom, label=modality)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax2.set_xticks(range(len(variants)), [n for n, _ in variants], fontsize=8)
    ax2.set_ylim(0, 1.2)
    ax2.set_ylabel("mean attention share")
    ax2.legend(loc="upper center", ncol=3, fontsize=8)
    ax2.set_title("attention share per modality (text queries)", fontsize=10)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def write_tradeoff_chart(path: Path, results: dict) -> None:
    """VA against AA accuracy as AR strength goes 0 -> 1 (one curve per AR option, without MoSE solid,
    with MoSE dashed), the references and the VA + AA = const lines; and mean3 against strength."""
    plt = _pyplot()
    t = results["tradeoff"]
    strengths = results["settings"]["ar_strengths"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for model, style in (("backbone", "-"), ("mose", "--")):
        for k, (option, curve) in enumerate(t["curves"][model].items()):
            label = f"{'MoSE + ' if model == 'mose' else ''}AR {option}"
            ax.plot(curve[VIDEO_ALIGNED], curve[AUDIO_ALIGNED], style, marker="o", ms=3, color=colors[k], label=label)
            ax2.plot(strengths, curve["mean3"], style, marker="o", ms=3, color=colors[k], label=label)
        start = next(iter(t["curves"][model].values()))
        ax.plot(start[VIDEO_ALIGNED][0], start[AUDIO_ALIGNED][0], "s" if model == "backbone" else "D", ms=8,
                color="black" if model == "backbone" else "dimgrey", zorder=5,
                label="backbone (strength 0)" if model == "backbone" else "MoSE (strength 0)")
    markers = {"bayes_optimal": ("*", "goldenrod"), "full_finetune": ("P", "purple"), "lora": ("X", "teal")}
    for name, ref in t["references"].items():
        marker, color = markers.get(name, ("x", "black"))
        ax.plot(ref[VIDEO_ALIGNED], ref[AUDIO_ALIGNED], marker, color=color, ms=11, zorder=6,
                label=_label(name, results))
        ax2.axhline(ref["mean3"], color=color, lw=0.8, ls=":")
        ax2.annotate(_label(name, results), (strengths[-1], ref["mean3"]), fontsize=7, ha="right", va="bottom",
                     color=color)
    base = next(iter(t["curves"]["backbone"].values()))
    total = base[VIDEO_ALIGNED][0] + base[AUDIO_ALIGNED][0]
    for offset in (-20, -10, 0, 10, 20, 30, 40):
        xs = [0, 100]
        ax.plot(xs, [total + offset - x for x in xs], color="grey", lw=0.5 if offset else 1.0, ls=":", zorder=0)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_aspect("equal")
    ax.set_xlabel("video-aligned accuracy (%)")
    ax.set_ylabel("audio-aligned accuracy (%)")
    ax.set_title(f"VA vs AA as AR strength goes 0 -> 1 ({t['split']} split; dotted: VA + AA = const,\n"
                 "the darker one through the backbone; solid: backbone + AR, dashed: MoSE + AR)", fontsize=9)
    ax.legend(fontsize=6.5, loc="lower left")
    ax2.set_xlabel("AR strength")
    ax2.set_ylabel("mean3 (%)")
    ax2.set_title(f"mean3 against AR strength ({t['split']} split, mean over seeds)", fontsize=9)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def write_results(out_dir: Path, results: dict) -> None:
    """``results.md``, the charts, then ``results.json`` (last: its presence means all are complete)."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "results.md", "# mosear-demo: CA-MER on the audio-biased audio-visual LM\n\n"
                      + render_markdown(results))
    write_chart(out_dir / "demo.png", results)
    write_tradeoff_chart(out_dir / "tradeoff.png", results)
    atomic_write_json(out_dir / "results.json", results)


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between ``BEGIN`` and ``END`` replaced by ``block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README: expected one {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN)
    return head + BEGIN + "\n" + block + END + rest.split(END, 1)[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mosear_fast.training.demo_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="a results.json written by mosear-demo")
    p.add_argument("--write", type=Path, metavar="README", help="replace the demo block of this Markdown file and "
                   "redraw demo.png and tradeoff.png beside RESULTS (paths in the block relative to README)")
    args = p.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
    except (OSError, ValueError) as e:
        print(f"{p.prog}: error: {args.results}: cannot read a results.json ({e})", file=sys.stderr)
        return 2
    if args.write is None:
        print(render_table(results))
        return 0
    folder = args.results.parent
    try:
        charts = tuple(str((folder / n).resolve().relative_to(args.write.resolve().parent))
                       for n in ("demo.png", "tradeoff.png"))
        text = replace_block(args.write.read_text(), render_markdown(results, charts=charts))
    except (OSError, ValueError) as e:
        print(f"{p.prog}: error: --write {args.write}: {e}", file=sys.stderr)
        return 2
    write_chart(folder / "demo.png", results)
    write_tradeoff_chart(folder / "tradeoff.png", results)
    atomic_write_text(args.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["BEGIN", "END", "claims", "main", "markdown_table", "render_markdown", "render_table", "replace_block",
           "write_chart", "write_results", "write_tradeoff_chart"]
