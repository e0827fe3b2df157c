"""Renders the JSON results under bench/results/ as Markdown tables (for the README).

``python -m bench.render`` prints the tables; ``--write README.md`` replaces the block between
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` so the README never drifts from the data.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from .environment import write_text_atomic

RESULTS = os.path.join(os.path.dirname(__file__), "results")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _shape(op, case):
    if op == "mose":
        return f"N={case['n_tokens']} {case['d_in']}->{case['d_out']} r={case['rank']}"
    return (f"B={case['batch']} H={case['n_q_heads']}/{case['n_kv_heads']} Lq={case['len_q']} "
            f"Lk={case['len_k']} D={case['head_dim']}")


def table(result: dict) -> str:
    env = result["environment"]
    names = list(result["providers"])
    title = (f"**{result['op']} / {result['preset']} / {result['mode']}** on {env['device']} "
             f"(torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date'][:10]}); "
             f"median ms (ratio to `{result['floor']}`)")
    lines = [title, "", "| shape | dtype | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for row in result["results"]:
        cells = []
        for n in names:
            t = row["providers"].get(n, {})
            if "median_ms" in t:
                cells.append(f"{t['median_ms']:.3g} ({t['ratio_to_floor']:.2f}x)")
            else:
                cells.append("n/a")
        lines.append(f"| {_shape(result['op'], row['case'])} | {row['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(paths) -> str:
    results = [json.load(open(p)) for p in sorted(paths)]
    gpu = [r for r in results if r["environment"]["device_type"] == "cuda"]
    cpu = [r for r in results if r["environment"]["device_type"] != "cuda"]
    parts = ["#### GPU results", ""]
    parts += [table(r) + "\n" for r in gpu] or ["No GPU results yet: the GPU numbers are still to be taken.\n"]
    parts += ["#### CPU results (development machine; not representative of GPU speed)", ""]
    parts += [table(r) + "\n" for r in cpu] or ["No CPU results yet.\n"]
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__)
    p.add_argument("--results", default=RESULTS, help="folder of JSON results (default bench/results)")
    p.add_argument("--write", default=None, help="a Markdown file whose bench block is replaced")
    args = p.parse_args(argv)
    text = render(glob.glob(os.path.join(args.results, "*.json")))
    if args.write is None:
        print(text)
        return 0
    doc = open(args.write).read()
    if BEGIN not in doc or END not in doc:
        print(f"python -m bench.render: error: {args.write} has no {BEGIN} ... {END} block", file=sys.stderr)
        return 2
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    write_text_atomic(args.write, head + BEGIN + "\n" + text + END + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
