"""Shape ranges of the dynamic axes (``--batch MIN:OPT:MAX``, ``--seq MIN:OPT:MAX``) and what follows
from them: the shapes validation runs, the example shape the tracer sees, TensorRT's profile.

The default ``--seq`` depends on the source (``ExportModule.default_seq``): any length for a causal
LM, and for the audio-visual model lengths that hold its fixed placeholder tokens plus text."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BATCH = "1:2:4"
DEFAULT_SEQ = None  # the source's own default (ExportModule.default_seq)


@dataclass(frozen=True)
class AxisRange:
    """A dynamic axis: its name in the graph and the sizes it must accept, min <= opt <= max."""

    name: str
    min: int
    opt: int
    max: int

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


def parse_range(text: str, *, name: str, option: str, minimum: int = 1) -> AxisRange:
    """``"MIN:OPT:MAX"`` (or ``"N"`` for a fixed size) -> AxisRange; ValueError naming ``option``.
    ``minimum``: the smallest valid MIN (0 for a cache length)."""
    parts = str(text).split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = None
    if values is None or len(values) not in (1, 3):
        raise ValueError(f"{option}: expected MIN:OPT:MAX (ints) or one int, got {text!r}")
    low, opt, high = values * 3 if len(values) == 1 else values
    if low < minimum:
        raise ValueError(f"{option}: expected MIN >= {minimum}, got {text!r}")
    if low > high:
        raise ValueError(f"{option}: expected MIN <= MAX, got min {low} > max {high} in {text!r}")
    if not low <= opt <= high:
        raise ValueError(f"{option}: expected MIN <= OPT <= MAX, got {text!r}")
    return AxisRange(name, low, opt, high)


def check_within(axis: AxisRange, low: int, high: int | None, *, option: str, why: str = "") -> AxisRange:
    """``axis`` when all its sizes lie in [low, high] (high None: no upper bound); else ValueError naming
    ``option`` and the reason (``why``)."""
    reason = f" ({why})" if why else ""
    if axis.min < low:
        raise ValueError(f"{option}: this model needs {axis.name} >= {low}{reason}; got MIN {axis.min}")
    if high is not None and axis.max > high:
        raise ValueError(f"{option}: this model takes {axis.name} <= {high}{reason}; got MAX {axis.max}")
    return axis


def odd_size(axis: AxisRange) -> int:
    """A size strictly inside the range, odd where possible (catches even-only tiling assumptions)."""
    candidates = [s for s in range(axis.min + 1, axis.max) if s % 2 == 1 and s not in (axis.min, axis.opt)]
    if candidates:
        return candidates[len(candidates) // 2]
    return axis.max


def validation_shapes(batch: AxisRange, seq: AxisRange) -> list[tuple[str, int, int]]:
    """(label, batch, length) at min, opt, max and an odd shape of the ranges, without repeats."""
    shapes = [("min", batch.min, seq.min), ("opt", batch.opt, seq.opt), ("max", batch.max, seq.max),
              ("odd", odd_size(batch), odd_size(seq))]
    seen, unique = set(), []
    for label, b, t in shapes:
        if (b, t) not in seen:
            seen.add((b, t))
            unique.append((label, b, t))
    return unique


def default_past(seq: AxisRange) -> str:
    """The default ``--past`` of a with-past decoder: from an empty cache (prefill) to the longest prompt."""
    return f"0:{seq.opt}:{seq.max}"


def with_past_validation_shapes(batch: AxisRange, seq: AxisRange, past: AxisRange,
                                prefill_min: int = 1) -> list[tuple[str, int, int, int]]:
    """(label, batch, new tokens, cached tokens) for a with-past decoder: prefill (empty past) at the
    opt and max prompt lengths (at least ``prefill_min``, the prompt's fixed tokens), one-token decode
    after the opt and max caches, and an odd shape (several new tokens after an odd cache)."""
    cases = []
    if past.min == 0:
        for label, b, t in (("prefill-opt", batch.opt, seq.opt), ("prefill-max", batch.max, seq.max)):
            if t >= prefill_min:
                cases.append((label, b, t, 0))
    decode_len = max(1, seq.min)
    cases += [("decode-opt", batch.opt, decode_len, max(past.opt, 1) if past.max else 0),
              ("decode-max", batch.max, decode_len, past.max),
              ("odd", odd_size(batch), 3 if seq.min <= 3 <= seq.max else seq.min,
               odd_size(past) if past.max > past.min else past.max)]
    seen, unique = set(), []
    for case in cases:
        if case[1:] not in seen and case[3] <= past.max and past.min <= case[3]:
            seen.add(case[1:])
            unique.append(case)
    return unique


def trace_size(axis: AxisRange) -> int:
    """The example size given to the tracer: 0/1 would be specialised, so at least 2 when the range allows."""
    if axis.max == axis.min:
        return axis.min
    return min(axis.max, max(2, axis.opt))


def tensorrt_profile(specs, batch: AxisRange, seq: AxisRange,
                     past: AxisRange | None = None) -> dict[str, tuple[tuple, tuple, tuple]]:
    """One optimisation profile: input name -> ((min shape), (opt shape), (max shape)) for every input.
    ``specs``: ``InputSpec``s (axis names "batch", "seq", "past_seq" take their ranges, a sum of names
    ("past_seq + seq") the sum, ints stay), or plain names, taken as (batch, seq) inputs."""
    ranges = {axis.name: axis for axis in (batch, seq, past) if axis is not None}

    def size(dim, which):
        if not isinstance(dim, str):
            return int(dim)
        return sum(getattr(ranges[term.strip()], which) for term in dim.split("+"))

    profile = {}
    for spec in specs:
        name, dims = (spec, (batch.name, seq.name)) if isinstance(spec, str) else (spec.name, spec.shape)
        profile[name] = tuple(tuple(size(d, which) for d in dims) for which in ("min", "opt", "max"))
    return profile
