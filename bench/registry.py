"""Provider registry of the benchmarks.

A provider is a name, a setup and a callable: ``setup(case)`` builds its inputs for one case and
returns a zero-argument callable that runs the measured work once. A case is a dict of the op's
shape parameters plus ``dtype``, ``device`` and ``mode`` ("fwd" or "fwd_bwd"). Each op names one
floor provider; results are reported as ratios to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

OPS = ("mose", "ar")


@dataclass(frozen=True)
class Provider:
    op: str
    name: str
    setup: Callable[[dict], Callable[[], object]]
    # Returns a reason string when the provider cannot run this case (device, missing package...).
    unavailable: Callable[[dict], str | None] = lambda case: None
    description: str = ""


_REGISTRY: dict[str, dict[str, Provider]] = {op: {} for op in OPS}
FLOORS = {"mose": "linear", "ar": "sdpa"}


def register(provider: Provider) -> Provider:
    if provider.op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {provider.op!r}")
    if provider.name in _REGISTRY[provider.op]:
        raise ValueError(f"provider {provider.name!r} is already registered for {provider.op}")
    _REGISTRY[provider.op][provider.name] = provider
    return provider


def providers(op: str) -> dict[str, Provider]:
    from . import providers as _load  # noqa: F401  (registers every provider module)

    return dict(_REGISTRY[op])
