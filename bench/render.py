"""Renders the JSON results under bench/results/ as Markdown tables and PNG plots (for the README).

``python -m bench.render`` prints the tables; ``--write README.md`` replaces the block between
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` and writes the plots (PNG, beside the JSON
files), so the README never drifts from the data.

Four kinds of JSON files are read: one op benchmark (``python -m bench``), an op bundle (several
op results in one file, ``"kind": "op-bundle"``, as the GPU script writes them), an end-to-end
benchmark (``"kind": "e2e"``, ``python -m bench.e2e``) and the static kernel report
(``"kind": "kernel-report"``, ``python -m bench.kernel_report``). GPU results come first, then the
kernel report; CPU results are shown apart and labelled. Every table row names the card, the
library versions and the commit.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from mosear_fast.atomic import atomic_write_text

RESULTS = os.path.join(os.path.dirname(__file__), "results")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
E2E_VARIANTS = ("backbone", "mosear_fast", "mosear_eager", "onnxruntime")


def _shape(op, case):
    if op == "mose":
        return f"N={case['n_tokens']} {case['d_in']}->{case['d_out']} r={case['rank']}"
    return (f"B={case['batch']} H={case['n_q_heads']}/{case['n_kv_heads']} Lq={case['len_q']} "
            f"Lk={case['len_k']} D={case['head_dim']}")


def _card(env: dict) -> str:
    name = env["device"]
    return name if env["device_type"] == "cuda" else name.replace("CPU: ", "CPU ")


def run_label(env: dict) -> str:
    """The card, versions and commit of one run, for a table cell."""
    parts = [_card(env) + (f" ({env['threads']} thread{'s' if env['threads'] != 1 else ''})"
                           if env.get("device_type") != "cuda" and env.get("threads") else ""),
             f"torch {env['torch']}"]
    if env.get("device_type") == "cuda":
        parts.append(f"CUDA {env.get('cuda')}")
        if env.get("triton"):
            parts.append(f"triton {env['triton']}")
    if env.get("transformers"):
        parts.append(f"transformers {env['transformers']}")
    parts.append(f"commit {env.get('commit')}")
    if env.get("clock"):
        parts.append(f"timed by {env['clock']}")
    if env.get("rounds"):
        parts.append(f"{env['rounds']} interleaved rounds")
    return ", ".join(parts)


def table(result: dict) -> str:
    """One op benchmark as a Markdown table (median ms and ratio to the floor per provider)."""
    env = result["environment"]
    names = list(result["providers"])
    title = (f"**{result['op']} / {result['preset']} / {result['mode']}** on {env['device']} "
             f"(torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date'][:10]}); "
             f"median ms (ratio to `{result['floor']}`)")
    lines = [title, "", "| shape | dtype | " + " | ".join(f"`{n}`" for n in names) + " | run |",
             "|---|---|" + "---|" * len(names) + "---|"]
    label = run_label(env)
    for row in result["results"]:
        cells = []
        for n in names:
            t = row["providers"].get(n, {})
            if "median_ms" in t:
                ratio = t.get("ratio_to_floor")
                cells.append(f"{t['median_ms']:.3g}" + (f" ({ratio:.2f}x)" if ratio is not None else ""))
            else:
                cells.append("n/a")
        lines.append(f"| {_shape(result['op'], row['case'])} | {row['dtype']} | " + " | ".join(cells)
                     + f" | {label} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# End-to-end results
# -------------------------------------------------------------------------------------------------


def _variants(result, model):
    present = {v for kind in ("prefill", "decode", "train") for row in model[kind] for v in row["variants"]}
    return [v for v in E2E_VARIANTS if v in present and v in result.get("variants", E2E_VARIANTS)]


def _ratio(t):
    r = t.get("ratio_to_floor")
    return f" ({r:.2f}x)" if r is not None else ""


def _mib(value):
    return "" if value is None else f", {value / 2**20:.0f} MiB"


def _speedup(row):
    t = row["variants"].get("mosear_fast", {})
    value = t.get("speedup_over_eager")
    return f"{value:.2f}x" if value is not None else "n/a"


def e2e_tables(result: dict) -> str:
    """An e2e result as Markdown: per model, prefill / decode / training tables and the targets."""
    env, settings = result["environment"], result["settings"]
    label = run_label(env)
    parts = []
    for model in result["models"]:
        names = _variants(result, model)
        dims = model["dims"]
        head = " | ".join(f"`{n}`" for n in names)
        sep = "---|" * len(names)
        parts.append(
            f"**e2e / {result['preset']} / {model['model']}** on {env['device']} ({model['layers']} of "
            f"{model['full_layers']} layers measured: hidden {dims['hidden']}, heads {dims['heads']}/"
            f"{dims['kv_heads']}, MLP {dims['mlp']}; {settings['dtype']}; MoSE r={settings['mose']['r']} "
            f"E={settings['mose']['num_experts']} on q/v, AR on all layers; {env['date'][:10]})")
        parts.append("")
        parts.append(f"Prefill, batch 1: ms per layer (ratio to `{result['floor']}`); full depth = per layer "
                     f"x {model['full_layers']}")
        parts.append("")
        parts.append(f"| prompt | {head} | `mosear_fast` full depth | speed-up over eager | run |")
        parts.append(f"|---|{sep}---|---|---|")
        for row in model["prefill"]:
            cells = [f"{t['per_layer_ms']:.3g}{_ratio(t)}" if "per_layer_ms" in t else "n/a"
                     for t in (row["variants"].get(n, {}) for n in names)]
            fast = row["variants"].get("mosear_fast", {})
            full = f"{fast['scaled_ms']:.4g} ms" if "scaled_ms" in fast else "n/a"
            parts.append(f"| {row['length']} | " + " | ".join(cells) + f" | {full} | {_speedup(row)} | {label} |")
        parts.append("")
        parts.append(f"Decode ({model['decode'][0]['new_tokens'] if model['decode'] else '-'} greedy steps after "
                     f"the prompt, KV cache): tokens/s scaled to {model['full_layers']} layers (time ratio to "
                     f"`{result['floor']}`)")
        parts.append("")
        decode_names = [n for n in names if n != "onnxruntime"]
        parts.append("| batch (context) | " + " | ".join(f"`{n}`" for n in decode_names)
                     + " | speed-up over eager | run |")
        parts.append("|---|" + "---|" * len(decode_names) + "---|---|")
        for row in model["decode"]:
            cells = [f"{t['scaled_tokens_per_s']:.4g}{_ratio(t)}" if "scaled_tokens_per_s" in t else "n/a"
                     for t in (row["variants"].get(n, {}) for n in decode_names)]
            parts.append(f"| {row['batch']} ({row['context']}) | " + " | ".join(cells)
                         + f" | {_speedup(row)} | {label} |")
        parts.append("")
        parts.append(f"Training step (forward + backward; MoSE trained, backbone frozen, AR off): tokens/s "
                     f"scaled to {model['full_layers']} layers, peak memory of the measured stack (CUDA only)")
        parts.append("")
        parts.append("| batch x length | " + " | ".join(f"`{n}`" for n in decode_names)
                     + " | speed-up over eager | run |")
        parts.append("|---|" + "---|" * len(decode_names) + "---|---|")
        for row in model["train"]:
            cells = [f"{t['scaled_tokens_per_s']:.4g}{_mib(t.get('peak_memory_bytes'))}"
                     if "scaled_tokens_per_s" in t else "n/a"
                     for t in (row["variants"].get(n, {}) for n in decode_names)]
            parts.append(f"| {row['batch']} x {row['length']} | " + " | ".join(cells)
                         + f" | {_speedup(row)} | {label} |")
        parts.append("")
        targets = model.get("targets") or []
        if targets:
            checked = any(t["met"] is not None for t in targets)
            if checked:
                marks = {True: "met", False: "**missed**", None: "not measured"}
                parts.append("Targets:")
                parts.append("")
                parts += [f"- {t['name']}: {_value(t['value'])} ({marks[t['met']]})" for t in targets]
            else:
                parts.append("Targets not checked on this run (they apply to an H100/H200 in bf16).")
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def _value(value):
    return "n/a" if value is None else f"{value:.3g}"


# -------------------------------------------------------------------------------------------------
# Files and the README block
# -------------------------------------------------------------------------------------------------


def kernel_report_section(report: dict) -> str:
    """The static kernel report (``python -m bench.kernel_report``): its headline cases as a table."""
    from .kernel_report.table import markdown_table, roofline_lines

    env = report["environment"]
    main = [r for r in report["records"] if r["case"]["main"]]
    main_cases = {r["case"]["name"] for r in main}
    parts = [
        "#### Static kernel report (sm_90a, no GPU)",
        "",
        f"Every Triton launch of the launchers at the GPU presets, specialised by Triton's own binder and compiled "
        f"for sm_90a without a GPU (triton {env['triton']}, commit {env['commit']}); H100 limits for occupancy "
        f"and waves ({env['limits']['sm_count']} SMs). `mma / expected`: static MMA instructions per warpgroup "
        f"(wgmma) or warp (mma.sync) in the PTX against what the tile math needs without duplicated rows "
        f"((!) = duplicated work). These are compiled facts, not timings. Headline shapes and their variants "
        f"below; all {len(report['records'])} launches in `bench/results/kernel-report-sm90a.json` "
        f"(`python -m bench.kernel_report --op all`).",
        "",
        markdown_table(main),
        "",
        "Roofline lower bounds of the headline cases (whole call; peak HBM 3.35 TB/s, dense bf16 990 TFLOP/s):",
        "",
    ]
    parts += [f"- {line}" for line in roofline_lines([x for x in report["roofline"] if x["case"] in main_cases])]
    if report.get("errors"):
        parts += ["", "Kernels that did not compile: " + "; ".join(e["kernel"] for e in report["errors"])]
    return "\n".join(parts) + "\n"


def load_kernel_reports(paths) -> list[dict]:
    reports = []
    for path in sorted(paths):
        with open(path) as f:
            data = json.load(f)
        if data.get("kind") == "kernel-report":
            reports.append(data)
    return reports


def load(paths) -> list[tuple[str, dict]]:
    """(path, result) for every result in the files; op bundles are expanded."""
    loaded = []
    for path in sorted(paths):
        with open(path) as f:
            data = json.load(f)
        if data.get("kind") == "op-bundle":
            loaded.extend((path, r) for r in data["results"])
        elif data.get("kind") == "e2e" or "op" in data:
            loaded.append((path, data))
    return loaded


def _plot_path(path: str, result: dict, plots_dir: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(plots_dir, f"{stem}.png")


def render(paths, *, plots_dir: str | None = None, link_from: str | None = None, write_plots: bool = True) -> str:
    """The Markdown block for the result files ``paths``. With ``plots_dir``, the e2e plots are written
    there (unless ``write_plots`` is False) and linked, relative to the folder ``link_from`` (default
    the current one)."""
    loaded = load(paths)
    sections = []
    for title, is_gpu in (("#### GPU results", True),
                          ("#### CPU results (development machine; not representative of GPU speed)", False)):
        chosen = [(p, r) for p, r in loaded if (r["environment"]["device_type"] == "cuda") == is_gpu]
        parts = [title, ""]
        e2e = [(p, r) for p, r in chosen if r.get("kind") == "e2e"]
        ops = [r for _, r in chosen if r.get("kind") != "e2e"]
        for path, result in e2e:
            parts.append(e2e_tables(result))
            if plots_dir is not None:
                from .plots import has_plot, plot_e2e

                png = _plot_path(path, result, plots_dir)
                png = plot_e2e(result, png) if write_plots else (png if has_plot(result) else None)
                if png is not None:
                    link = os.path.relpath(png, link_from or os.getcwd()).replace(os.sep, "/")
                    parts.append(f"![e2e {result['preset']} on {result['environment']['device']}]({link})\n")
        parts += [table(r) + "\n" for r in ops]
        if not chosen:
            parts.append("No GPU results yet: the GPU numbers are still to be taken (run `bash bench/gpu_run.sh` "
                         "on an H100 or H200).\n" if is_gpu else "No CPU results yet.\n")
        sections.append("\n".join(parts).rstrip() + "\n")
        if is_gpu:  # the compiled facts stand in for GPU numbers until there are some
            sections += [kernel_report_section(r) for r in load_kernel_reports(paths)]
    return "\n".join(sections)


def replace_block(doc: str, text: str) -> str:
    if BEGIN not in doc or END not in doc:
        raise ValueError(f"no {BEGIN} ... {END} block")
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return head + BEGIN + "\n" + text + END + tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=RESULTS, help="folder of JSON results (default bench/results)")
    p.add_argument("--write", default=None, help="a Markdown file whose bench block is replaced (plots written too)")
    p.add_argument("--plots", default=None, help="folder for the PNG plots (default: the results folder, with --write)")
    args = p.parse_args(argv)
    paths = glob.glob(os.path.join(args.results, "*.json"))
    plots_dir = args.plots or (args.results if args.write else None)
    link_from = os.path.dirname(os.path.abspath(args.write)) if args.write else None
    try:
        text = render(paths, plots_dir=plots_dir, link_from=link_from)
    except (KeyError, ValueError, json.JSONDecodeError) as err:
        print(f"python -m bench.render: error: unreadable result: {err}", file=sys.stderr)
        return 2
    if args.write is None:
        print(text)
        return 0
    with open(args.write) as f:
        doc = f.read()
    try:
        doc = replace_block(doc, text)
    except ValueError:
        print(f"python -m bench.render: error: {args.write} has no {BEGIN} ... {END} block", file=sys.stderr)
        return 2
    atomic_write_text(args.write, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
