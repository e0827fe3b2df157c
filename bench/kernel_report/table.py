"""The report's records as a table: plain text for the terminal, Markdown for the README (no triton import)."""

from __future__ import annotations

COLUMNS = ("kernel", "case", "grid", "warps/stages", "regs", "spill B", "smem KiB", "CTAs/SM", "occupancy",
           "waves", "mma / expected", "pipelined", "ex2")


def _num(x, digits=2) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}".rstrip("0").rstrip(".") if isinstance(x, float) else str(x)


def row(r: dict) -> list[str]:
    grid = "x".join(str(g) for g in r["grid"])
    mma = f"{r['mma_instructions']} / {_num(r['expected_mma_instructions'])}"
    if r["expected_mma_instructions"] is not None and r["mma_instructions"] > r["expected_mma_instructions"]:
        mma += " (!)"
    return [r["kernel"].removesuffix("_kernel"), r["case"]["name"], grid, f"{r['num_warps']}/{r['num_stages']}",
            str(r["regs"]), str(r["spill_bytes"]), _num(r["smem_bytes"] / 1024, 1), str(r["ctas_per_sm"]),
            f"{r['occupancy']:.0%}", _num(r["waves"]), mma, "yes" if r["pipelined"] else "no", str(r["ex2"])]


def text_table(records: list[dict]) -> str:
    rows = [list(COLUMNS)] + [row(r) for r in records]
    widths = [max(len(x[i]) for x in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in rows)


def markdown_table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in records]
    return "\n".join(lines)


def roofline_lines(roofline: list[dict]) -> list[str]:
    return [f"{x['case']}: {x['bytes'] / 1e6:.1f} MB, {x['flops'] / 1e9:.1f} GFLOP -> >= {x['memory_us']:.1f} us "
            f"(HBM) / {x['compute_us']:.1f} us (bf16 tensor) at peak: {x['bound']}-bound" for x in roofline]
