"""``python -m bench.kernel_report``: static sm_90a report of every Triton kernel launch (no GPU needed).

Runs the real launchers of the op(s) on CPU tensors at the GPU presets' shapes (plus flag and dtype
variants at the headline shapes), with every Triton launch recorded instead of run and the launch
planning of a 132-SM H100 (``mosear_fast.kernels.target.pretend``). Each distinct specialisation is
bound by Triton's own argument binder, compiled for sm_90a (``triton.compile``, GPUTarget cuda 90)
and measured: registers and spills (bundled ptxas -v), shared memory, CTAs per SM and occupancy
(H100 limits), waves of the grid, MMA instructions counted in the PTX against the tile math's
expectation, pipelined main loops (async copies / TMA in the TTGIR), ex2 count. One JSON record per
launch (--json), a table on stdout, and a roofline line per case.

The full report (--op all) takes a few minutes on a 2-core machine (it compiles every distinct
kernel once; Triton's cache makes a rerun faster). Exit status 1 if a kernel did not compile,
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from mosear_fast.atomic import atomic_write_text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=("ar", "mose", "all"), required=True, help="which op's kernels")
    p.add_argument("--case", action="append", default=None, metavar="NAME",
                   help="only this case (repeatable; names from --list)")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--json", default=None, metavar="PATH", help="write the records as JSON (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress and no table")
    args = p.parse_args(argv)

    from .report import OPS, build, dumps, select_cases
    from .table import roofline_lines, text_table

    ops = list(OPS) if args.op == "all" else [args.op]
    try:
        cases = select_cases(ops, args.case)
    except ValueError as err:
        print(f"python -m bench.kernel_report: {err}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(f"{c.op:5s} {c.name}{'  (main)' if c.main else ''}" for c in cases))
        return 0
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    report = build(ops, args.case, log=log)
    if args.json:
        atomic_write_text(args.json, dumps(report))
    if not args.quiet:
        print(text_table(report["records"]))
        print()
        print("\n".join(roofline_lines(report["roofline"])))
    for error in report["errors"]:
        print(f"python -m bench.kernel_report: {error['kernel']} did not compile: {error['error']}", file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
