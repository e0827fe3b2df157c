"""Configuration of attention reallocation (AR, DESIGN 2.2) in a Hugging Face model."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ._validation import _float_sequence, _real
from .backend import BACKENDS
from .modality import check_modality_names, modality_index, modality_indices


@dataclass
class ARConfig:
    """Where and how AR reallocates attention mass between modalities.

    - ``modalities``: modality names (ids are their positions); None = those of the MoSEConfig
      given to ``apply_mosear``, else ``("text", "visual", "audio")``.
    - ``layers``: decoder layer indices with AR (None = all); other layers run plain sdpa.
    - ``strength`` in [0, 1], ``threshold`` >= 0: DESIGN 2.2 step 3.
    - ``balance``: the modalities whose masses are balanced (names or ids; default visual and audio).
    - ``target``: None (uniform) or one positive float per balance modality.
    - ``modality_bias``: None, one float per modality, or ``{modality: float}`` (others 0): a logit bias.
    - ``query_modalities``: the queries that are reallocated (default text queries: the prompt's text
      and every generated token), so answers attend to audio and video in balance.
    - ``backend``: the ``ar_attention`` backend ("auto", "torch", "triton").
    - ``record_shares``: keep each layer's mean attention shares for ``attention_shares(model)``
      (a few small ops per layer and forward); False for the leanest decoding.
    """

    modalities: Sequence[str] | None = None
    layers: Sequence[int] | None = None
    strength: float = 0.5
    threshold: float = 0.0
    balance: Sequence = ("visual", "audio")
    target: Sequence[float] | None = None
    modality_bias: Sequence[float] | Mapping | None = None
    query_modalities: Sequence = ("text",)
    backend: str = "auto"
    record_shares: bool = True

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
        if self.backend not in BACKENDS:
            raise ValueError(f"ARConfig.backend: expected one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.record_shares, bool):
            raise TypeError(f"ARConfig.record_shares: expected a bool, got {type(self.record_shares).__name__}")

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
        target = None
        if self.target is not None:
            target = _float_sequence("ARConfig.target", self.target, len(balance), positive=True)
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
                    threshold=self.threshold, modality_bias=bias, query_modalities=query,
                    backend=self.backend, record_shares=self.record_shares)
