"""Configuration of attention reallocation (AR, DESIGN 2.2) in a Hugging Face model."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ._validation import _float_sequence, _real, check_balance_by, check_target
from .backend import BACKENDS
from .modality import check_modality_names, modality_index, modality_indices


def _plain_floats(target: torch.Tensor):
    """A tensor target as a tuple of floats (or of per-head tuples); values are checked at resolve."""
    values = target.detach().cpu().tolist()
    return tuple(tuple(row) if isinstance(row, list) else row for row in values) if isinstance(values, list) \
        else values


def _check_share_readout(record_shares, balance_by, target):
    """Interim: hf_attention's share read-out (``attention_shares(model, reallocated=True)``) recomputes
    the reallocation from the masses with one target for all heads."""
    per_head = isinstance(target, Sequence) and len(target) > 0 and isinstance(target[0], (Sequence, torch.Tensor)) \
        and not isinstance(target[0], (str, bytes))
    if record_shares and (balance_by != "mass" or per_head):
        what = f"balance_by={balance_by!r}" if balance_by != "mass" else "a per-head target"
        raise ValueError(f"ARConfig.record_shares: the attention-share read-out does not support {what} "
                         "yet; pass record_shares=False with it")


@dataclass
class ARConfig:
    """Where and how AR reallocates attention mass between modalities.

    - ``modalities``: modality names (ids are their positions); None = those of the MoSEConfig
      given to ``apply_mosear``, else ``("text", "visual", "audio")``.
    - ``layers``: decoder layer indices with AR (None = all); other layers run plain sdpa.
    - ``strength`` in [0, 1], ``threshold`` >= 0: DESIGN 2.2 step 3.
    - ``balance``: the modalities whose masses are balanced (names or ids; default visual and audio).
    - ``balance_by``: "mass" (DESIGN 2.2: shares of attention mass) or "contribution" (DESIGN 2.2b:
      shares of ``P_m * ||vbar_m||``, what each modality adds to the output).
    - ``target``: None (uniform); one positive float per balance modality, or a (|S|,) tensor; or one
      target per query head, an (Hq, |S|) tensor or Hq such sequences (e.g. calibrated per head),
      used on every AR layer (Hq is checked at the first forward). A tensor is stored as plain floats
      (so the config saves as JSON); ``apply_mosear`` checks the values and normalises each row in
      float64 to sum 1, as ``ar_attention`` does.
    - ``modality_bias``: None, one float per modality, or ``{modality: float}`` (others 0): a logit bias.
    - ``query_modalities``: the queries that are reallocated (default text queries: the prompt's text
      and every generated token), so answers attend to audio and video in balance.
    - ``backend``: the ``ar_attention`` backend ("auto", "torch", "triton").
    - ``record_shares``: keep each layer's mean attention shares for ``attention_shares(model)``
      (a few small ops per layer and forward); False for the leanest decoding. The share read-out
      reallocates masses with one target for all heads, so it needs ``balance_by="mass"`` and no
      per-head target: the other combinations need ``record_shares=False`` for now.
    """

    modalities: Sequence[str] | None = None
    layers: Sequence[int] | None = None
    strength: float = 0.5
    threshold: float = 0.0
    balance: Sequence = ("visual", "audio")
    target: Sequence | torch.Tensor | None = None
    modality_bias: Sequence[float] | Mapping | None = None
    query_modalities: Sequence = ("text",)
    backend: str = "auto"
    record_shares: bool = True
    balance_by: str = "mass"

    def __post_init__(self):
        if self.modalities is not None:
            self.modalities = check_modality_names("ARConfig.modalities", self.modalities)
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
                raise TypeError("ARConfig.layers: expected None or a sequence of layer indices, got "
                                f"{type(self.layers).__name__}")
            if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0
                       for i in self.layers):
                raise ValueError(f"ARConfig.layers: expected non-negative ints, got {tuple(self.layers)!r}")
            self.layers = tuple(int(i) for i in self.layers)
        self.strength = _real("ARConfig.strength", self.strength, low=0.0, high=1.0)
        self.threshold = _real("ARConfig.threshold", self.threshold, low=0.0)
        if isinstance(self.target, torch.Tensor):
            self.target = _plain_floats(self.target)
        self.balance_by = check_balance_by("ARConfig.balance_by", self.balance_by)
        if not isinstance(self.record_shares, bool):
            raise TypeError(f"ARConfig.record_shares: expected a bool, got {type(self.record_shares).__name__}")
        _check_share_readout(self.record_shares, self.balance_by, self.target)
        if self.backend not in BACKENDS:
            raise ValueError(f"ARConfig.backend: expected one of {BACKENDS}, got {self.backend!r}")

    def resolve(self, modalities: Sequence[str]) -> dict:
        """Ids and floats for ``ar_attention`` against the model's modality names (checked here)."""
        names = tuple(modalities)
        if self.modalities is not None and tuple(self.modalities) != names:
            raise ValueError(f"ARConfig.modalities: {tuple(self.modalities)!r} differ from the MoSEConfig's "
                             f"{names!r}; give both configs the same modalities (or leave ARConfig's None)")
        balance = modality_indices("ARConfig.balance", self.balance, names)
        if len(balance) < 2:
            raise ValueError("ARConfig.balance: expected at least 2 modalities to balance, got "
                             f"{tuple(self.balance)!r}")
        target = check_target("ARConfig.target", self.target, len(balance))
        balance_by = check_balance_by("ARConfig.balance_by", self.balance_by)
        _check_share_readout(self.record_shares, balance_by, target)
        bias = None
        if isinstance(self.modality_bias, Mapping):
            bias = [0.0] * len(names)
            for key, value in self.modality_bias.items():
                bias[modality_index(f"ARConfig.modality_bias[{key!r}]", key, names)] = \
                    _real(f"ARConfig.modality_bias[{key!r}]", value)
            bias = tuple(bias)
        elif self.modality_bias is not None:
            bias = _float_sequence("ARConfig.modality_bias", self.modality_bias, len(names))
        query = modality_indices("ARConfig.query_modalities", self.query_modalities, names)
        return dict(num_modalities=len(names), balance=balance, target=target, strength=self.strength,
                    threshold=self.threshold, balance_by=balance_by,
                    modality_bias=bias, query_modalities=query,
                    backend=self.backend, record_shares=self.record_shares)
