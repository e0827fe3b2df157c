"""Static facts of a compiled kernel: resources (ptxas), occupancy, MMA and copy instructions.

Everything is read from what ``triton.compile`` produced for sm_90a: registers and spills from the
bundled ptxas run with ``-v`` through Triton's own ``make_cubin`` (so with Triton's ptxas flags),
shared memory from the compiled metadata, MMA/ex2 instructions counted in the PTX, dot layouts and
software pipelining read from the TTGIR.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass

from triton import knobs

# ------------------------------------------------------------------------------------------------
# The target's limits
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmLimits:
    """Per-SM limits of the target (CUDA occupancy calculator, compute capability 9.0) and its roofline."""

    name: str = "H100 SXM"
    sm_count: int = 132
    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256  # registers are allocated per warp, in units of 256
    sub_partitions: int = 4  # the register file is split over 4 schedulers
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024  # the most one block may use
    smem_reserved_per_block: int = 1024  # the driver's share of every block
    smem_alloc_unit: int = 128
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    hbm_bytes_per_s: float = 3.35e12
    dense_bf16_flops: float = 990e12


H100 = SmLimits()


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(regs: int, smem_bytes: int, num_warps: int, limits: SmLimits = H100) -> dict:
    """Resident CTAs per SM and the resulting warp occupancy, with the resource that limits them."""
    regs_per_warp = _round_up(max(regs, 1) * 32, limits.reg_alloc_unit)
    warps_by_regs = (limits.regs_per_sm // limits.sub_partitions // regs_per_warp) * limits.sub_partitions
    smem_per_block = _round_up(smem_bytes + limits.smem_reserved_per_block, limits.smem_alloc_unit)
    by = {
        "registers": warps_by_regs // num_warps,
        "shared_memory": limits.smem_per_sm // smem_per_block if smem_bytes <= limits.smem_per_block else 0,
        "warps": limits.max_warps_per_sm // num_warps,
        "blocks": limits.max_blocks_per_sm,
    }
    limiter = min(by, key=by.get)
    ctas = by[limiter]
    return dict(ctas_per_sm=ctas, occupancy=round(ctas * num_warps / limits.max_warps_per_sm, 4),
                occupancy_limiter=limiter)


def waves(grid_size: int, ctas_per_sm: int, limits: SmLimits = H100) -> float | None:
    """Grid size over what the whole device holds at once (None when not even one CTA fits)."""
    if ctas_per_sm == 0:
        return None
    return round(grid_size / (ctas_per_sm * limits.sm_count), 4)


# ------------------------------------------------------------------------------------------------
# ptxas
# ------------------------------------------------------------------------------------------------

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict:
    """Registers and spills of the (single) kernel in a ``ptxas -v`` log."""
    regs = _REGS.search(log)
    spills = _SPILLS.search(log)
    if regs is None or spills is None:
        raise ValueError(f"ptxas log: no 'Used N registers' / 'bytes spill' lines in {log[:500]!r}")
    stack, stores, loads = (int(x) for x in spills.groups())
    return dict(regs=int(regs.group(1)), spill_stores=stores, spill_loads=loads, spill_bytes=stores + loads,
                stack_bytes=stack)


def ptxas_log(compiled, backend, options) -> str:
    """The ``ptxas -v`` log of the compiled PTX, from Triton's own ``make_cubin`` (same flags, same ptxas)."""
    opt = backend.parse_options(options)
    capability = compiled.metadata.target.arch
    out = io.StringIO()
    previous = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints the log it always asks ptxas for
    try:
        with contextlib.redirect_stdout(out):
            backend.make_cubin(compiled.asm["ptx"], {}, opt, capability)
    finally:
        knobs.nvidia.dump_ptxas_log = previous
    return out.getvalue()


# ------------------------------------------------------------------------------------------------
# PTX
# ------------------------------------------------------------------------------------------------

_MMA = re.compile(r"^\s*(?:@%p\d+\s+)?((?:wgmma\.mma_async|mma\.sync\.aligned)[\w.]*)", re.MULTILINE)
_MMA_SHAPE = re.compile(r"\.m(\d+)n(\d+)k(\d+)")


def mma_instructions(ptx: str) -> dict[str, int]:
    """Static count of tensor-core MMA instructions by shape ("wgmma.m64n64k16", "mma.m16n8k16")."""
    counts: dict[str, int] = {}
    for mnemonic in _MMA.findall(ptx):
        m, n, k = _MMA_SHAPE.search(mnemonic).groups()
        name = f"{'wgmma' if mnemonic.startswith('wgmma') else 'mma'}.m{m}n{n}k{k}"
        counts[name] = counts.get(name, 0) + 1
    return counts


def ex2_instructions(ptx: str) -> int:
    """Static count of ``ex2.approx`` (the exp2 of a softmax): duplicated exp work shows here."""
    return len(re.findall(r"^\s*(?:@%p\d+\s+)?ex2\.approx", ptx, re.MULTILINE))


# ------------------------------------------------------------------------------------------------
# TTGIR
# ------------------------------------------------------------------------------------------------

_LAYOUT = re.compile(r"^#(\w+) = #ttg\.nvidia_mma<\{(.*)\}>", re.MULTILINE)
_DOT = re.compile(r"\b(ttng\.warp_group_dot|tt\.dot)\s")
_OPERAND = re.compile(r"(?:tensor|memdesc)<(\d+)x(\d+)x(\w+?)[,>]")
_RESULT_LAYOUT = re.compile(r"->\s*tensor<[^,]+,\s*#(\w+)")
_ASYNC_COPY = re.compile(r"\b(ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local|"
                         r"ttng\.async_tma_gather)\b")
_LOAD = re.compile(r"\btt\.load\b")
_LOOP = re.compile(r"\bscf\.(for|while)\b")


def _ints(text: str, key: str) -> list[int] | None:
    found = re.search(key + r"\s*=\s*\[([\d,\s]+)\]", text)
    return [int(x) for x in found.group(1).split(",")] if found else None


def mma_layouts(ttgir: str) -> dict[str, dict]:
    """The ``#ttg.nvidia_mma`` layouts by alias: version, warpsPerCTA, instrShape."""
    layouts = {}
    for alias, body in _LAYOUT.findall(ttgir):
        version = re.search(r"versionMajor\s*=\s*(\d+)", body)
        layouts[alias] = dict(version=int(version.group(1)) if version else None,
                              warps_per_cta=_ints(body, "warpsPerCTA"), instr_shape=_ints(body, "instrShape"))
    return layouts


_K_BY_BITS = {8: 32, 16: 16, 32: 8}  # MMA K per instruction by operand width (tf32: 8)


def _bits(dtype: str) -> int:
    found = re.search(r"(\d+)", dtype)
    return int(found.group(1)) if found else 32


def _scan(ttgir: str):
    """Yields (line, loop depth) over the function bodies, tracking scf.for / scf.while regions."""
    stack: list[bool] = []  # one entry per open region: is it a loop body?
    for line in ttgir.splitlines():
        text = line.strip()
        closed = None
        if text.startswith("}"):
            closed = stack.pop() if stack else False
        yield text, sum(stack)
        if text.endswith("{"):
            # "} else {" / "} do {" continue the closed op's regions; a new op opens its own
            stack.append(closed if closed is not None else bool(_LOOP.search(text)))


def ttgir_dots(ttgir: str) -> list[dict]:
    """Every dot in the TTGIR: shape (m, n, k), operand dtype, MMA version and instruction, loop depth."""
    layouts = mma_layouts(ttgir)
    dots = []
    for text, depth in _scan(ttgir):
        if not _DOT.search(text) or " : " not in text:
            continue
        types = text.rsplit(" : ", 1)[1]
        operands = _OPERAND.findall(types)
        if len(operands) < 3:
            continue  # a batched (3-d) dot: not produced by these kernels
        (m, k, a_dtype), (_, n, _), _ = operands[:3]
        alias = _RESULT_LAYOUT.search(types)
        layout = layouts.get(alias.group(1)) if alias else None
        dot = dict(m=int(m), n=int(n), k=int(k), dtype=a_dtype, loop_depth=depth, mma_version=None,
                   warps_per_cta=None, instr=None)
        if layout is not None and layout["version"] in (2, 3):
            instr_shape = layout["instr_shape"] or []
            instr_k = instr_shape[2] if len(instr_shape) > 2 else _K_BY_BITS.get(_bits(a_dtype), 16)
            if layout["version"] == 3:  # one wgmma: 64 rows for a warpgroup of 4 warps
                instr = [64, instr_shape[1], instr_k]
            else:  # one mma.sync: 16 x 8 per warp
                instr = [16, 8, instr_k]
            dot.update(mma_version=layout["version"], warps_per_cta=layout["warps_per_cta"], instr=instr)
        dots.append(dot)
    return dots


def pipelining(ttgir: str) -> dict:
    """Async copies (cp.async / TMA) and plain loads inside loops: pipelined main loops use the former."""
    async_in_loop = plain_in_loop = 0
    for text, depth in _scan(ttgir):
        if depth == 0:
            continue
        if _ASYNC_COPY.search(text):
            async_in_loop += 1
        elif _LOAD.search(text):
            plain_in_loop += 1
    return dict(pipelined=async_in_loop > 0, async_copies_in_loop=async_in_loop, loads_in_loop=plain_in_loop)


# ------------------------------------------------------------------------------------------------
# Expected MMA work
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dot:
    """One ``tl.dot`` of a kernel's pass: [m, k] x [k, n], ``count`` times in the code."""

    m: int
    n: int
    k: int
    count: int = 1


def expected_mma(dots: list[Dot], compiled_dots: list[dict], num_warps: int) -> float | None:
    """Static MMA instructions one warp (mma.sync) or warpgroup (wgmma) needs if the work is split
    without duplication: per dot, (m x n x k) / (instruction m x n x k) / executing units, with the
    instruction shape the compiler chose for that dot. None if no TTGIR dot has a declared [m, n]."""
    total = 0.0
    for dot in dots:
        # the instruction the compiler chose for this dot; it may have split the dot along k
        # (e.g. 64 x 32 x 64 as two 64 x 32 x 32 dots), so (m, n) is enough when k differs
        match = next((c for c in compiled_dots if (c["m"], c["n"], c["k"]) == (dot.m, dot.n, dot.k)),
                     next((c for c in compiled_dots if (c["m"], c["n"]) == (dot.m, dot.n)), None))
        if match is None:
            return None
        if match["instr"] is None:  # an FMA dot (fp32 IEEE): no tensor-core instructions
            continue
        units = max(1, num_warps // 4) if match["mma_version"] == 3 else num_warps
        im, in_, ik = match["instr"]
        total += dot.count * (dot.m * dot.n * dot.k) / (im * in_ * ik) / units
    return round(total, 2)


def measure(compiled, backend, options: dict, limits: SmLimits = H100) -> dict:
    """Every static fact of one compiled kernel (no grid-dependent ones)."""
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    num_warps = compiled.metadata.num_warps
    facts = dict(num_warps=num_warps, num_stages=compiled.metadata.num_stages)
    facts.update(parse_ptxas_log(ptxas_log(compiled, backend, options)))
    facts["smem_bytes"] = int(compiled.metadata.shared)
    facts.update(occupancy(facts["regs"], facts["smem_bytes"], num_warps, limits))
    mma = mma_instructions(ptx)
    facts.update(mma_instructions=sum(mma.values()), mma_by_shape=mma, ex2=ex2_instructions(ptx))
    facts.update(pipelining(ttgir))
    facts["ttgir_dots"] = ttgir_dots(ttgir)
    return facts
