"""AR in the demo: the options (DESIGN 2.2, 2.2b), their strength sweep on validation, the choice.

Options (each at strengths ``settings.ar_strengths``; strength 0 is plain attention, the model itself):

- ``mass``: the default ``ARConfig``: visual and audio attention *mass* of every text query, head
  and layer pulled toward a uniform target;
- ``contribution``: the same on contributions ``P_m * ||vbar_m||`` (``balance_by="contribution"``);
- ``mass, calibrated`` / ``contribution, calibrated``: targets per layer and head measured on
  consistent samples of the fitting set (``ARConfig.calibrate``): where neither modality misleads,
  the shares the model gives are the ones to restore in a conflict.

The sweep evaluates every option and strength on the validation split; the choice is the setting
with the best validation mean3, strength 0 (no AR) included, so AR is only used where validation
supports it.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from .demo_eval import EvalSet, evaluate_camer
from .demo_stats import camer_metrics

AR_OPTIONS = ("mass", "contribution", "mass, calibrated", "contribution, calibrated")
NO_AR = "none"


def base_config(option: str):
    """The ``ARConfig`` of ``option`` (default strength: the sweep sets its own), before calibration."""
    from mosear_fast import ARConfig

    if option not in AR_OPTIONS:
        raise ValueError(f"option: expected one of {AR_OPTIONS}, got {option!r}")
    by = option.split(",")[0]
    # The share read-out handles mass balancing with one target only; others run without it.
    return ARConfig(balance_by=by, record_shares=by == "mass" and "calibrated" not in option)


def option_configs(options, calibration_model, calibration_batches) -> dict:
    """{option: ARConfig} (strength set by the sweep), the calibrated ones measured on ``calibration_model``."""
    configs = {}
    for option in options:
        config = base_config(option)
        if "calibrated" in option:
            config = config.calibrate(calibration_model, calibration_batches)
        configs[option] = config
    return configs


def with_ar(model, config):
    """A copy of ``model`` running AR with ``config`` (an ``ARConfig``)."""
    from mosear_fast import apply_mosear

    model = copy.deepcopy(model)
    apply_mosear(model.llm, ar=config)
    return model.eval()


def sweep(model, validation: EvalSet, configs: dict, strengths) -> dict:
    """{option: [camer_metrics at each strength]} on ``validation``; strength 0 is evaluated once
    (it is the model itself for every option)."""
    from mosear_fast import ARConfig

    plain = camer_metrics(evaluate_camer(with_ar(model, ARConfig(strength=0.0)), validation))
    curves = {}
    for option, config in configs.items():
        curves[option] = [plain if s == 0 else camer_metrics(evaluate_camer(with_ar(model, replace(config, strength=s)),
                                                                            validation))
                          for s in strengths]
    return curves


def choose(curves: dict, strengths) -> tuple[str, float]:
    """(option, strength) with the best validation mean3; (``NO_AR``, 0.0) when no AR setting beats
    plain attention. Ties go to the weaker strength and the earlier option."""
    plain = [m["mean3"] for points in curves.values() for s, m in zip(strengths, points, strict=True) if s == 0]
    best, best_value = (NO_AR, 0.0), plain[0] if plain else float("-inf")
    for option, points in curves.items():
        for strength, metrics in zip(strengths, points, strict=True):
            if strength > 0 and metrics["mean3"] > best_value:
                best, best_value = (option, float(strength)), metrics["mean3"]
    return best


__all__ = ["AR_OPTIONS", "NO_AR", "base_config", "choose", "option_configs", "sweep", "with_ar"]
