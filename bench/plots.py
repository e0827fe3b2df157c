"""PNG plots of the end-to-end results (matplotlib, Agg backend: no display needed).

One figure per e2e result file: prefill speed-up over the eager variant (left) and ratio to the
floor (right) against the prompt length, one line per (model, variant), log-2 length axis.
"""

from __future__ import annotations

from mosear_fast.atomic import atomic_save_figure

FLOOR, EAGER = "backbone", "mosear_eager"
STYLES = {"mosear_fast": "-o", "onnxruntime": "--s", "mosear_eager": ":^"}


def _series(model: dict, variant: str, key: str):
    xs, ys = [], []
    for row in model["prefill"]:
        value = row["variants"].get(variant, {}).get(key)
        if value is not None:
            xs.append(row["length"])
            ys.append(value)
    return xs, ys


def has_plot(result: dict) -> bool:
    """True when ``plot_e2e`` has a line to draw for this result."""
    return any(_series(model, variant, key)[0] for model in result["models"] for variant in STYLES
               for key in ("speedup_over_eager", "ratio_to_floor"))


def plot_e2e(result: dict, path: str) -> str | None:
    """Writes the figure of one e2e result to ``path``; returns the path, or None with nothing to plot."""
    if not has_plot(result):
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    env = result["environment"]
    where = env["device"] if env["device_type"] == "cuda" else f"CPU (development machine): {env['device']}"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn, lengths = False, set()
    for i, model in enumerate(result["models"]):
        color = f"C{i}"  # one colour per model, one line style per variant
        for variant, style in STYLES.items():
            for ax, key in ((left, "speedup_over_eager"), (right, "ratio_to_floor")):
                if ax is left and variant == EAGER:
                    continue
                xs, ys = _series(model, variant, key)
                if xs:
                    ax.plot(xs, ys, style, color=color, label=f"{model['model']} {variant}")
                    drawn = True
                    lengths.update(xs)
    if not drawn:
        plt.close(fig)
        return None
    left.axhline(1.0, color="grey", lw=0.8)
    right.axhline(1.0, color="grey", lw=0.8)
    for ax, title in ((left, f"prefill speed-up over `{EAGER}` (higher is better)"),
                      (right, f"prefill time / `{FLOOR}` (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(lengths), [str(n) for n in sorted(lengths)])
        ax.minorticks_off()
        ax.set_xlabel("prompt length (tokens, batch 1)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    settings = result["settings"]
    fig.suptitle(f"e2e {result['preset']}: {where}; {settings['layers']} layers, {settings['dtype']} "
                 f"(torch {env['torch']}, commit {env['commit']})", fontsize=9)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=90, metadata={"Software": None})
    return path
