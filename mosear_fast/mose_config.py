"""MoSEConfig: the MoSE adapter configuration (DESIGN 2.1), a PEFT config.

One class serves ``apply_mosear(model, mose=MoSEConfig(...))`` and
``peft.get_peft_model(model, MoSEConfig(...))``. It subclasses ``peft.PeftConfig``, so this module
imports peft (and transformers); ``mosear_fast`` imports it lazily. Importing it registers the MoSE
method with PEFT (``mosear_fast.peft_method``), which ``PeftModel.from_pretrained`` needs to find
a saved MoSE adapter.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from peft import PeftConfig

from ._validation import _real
from .modality import DEFAULT_MODALITIES, check_modality_names, modality_indices

PEFT_TYPE = "MOSE"  # custom PEFT type: a plain string key in PEFT's registries
ROUTING_MODES = ("token", "sequence")


@dataclass
class MoSEConfig(PeftConfig):
    """Modality-specific LoRA experts on the ``target_modules`` linears of a frozen model.

    - ``modalities``: names, ids by position (default text, visual, audio);
      ``adapted_modalities``: those that get adapters (None = all); tokens of the others keep the
      base output.
    - ``r``, ``alpha``, ``use_rslora``: LoRA rank and scale ``alpha / r`` (``alpha / sqrt(r)``).
    - ``num_experts`` up-projections per modality, ``top_k`` in {1, 2} of them per routing unit;
      ``routing``: "token" (each token) or "sequence" (the mean of each sample's tokens of a modality).
    - ``target_modules``: names (suffix match) or a regex (full match) of the ``nn.Linear`` modules.
    - ``dropout`` on the adapter's input (the base reads the undropped input).
    - ``load_balance_coef``, ``z_loss_coef``: weights of the regularizers in ``aux_loss``.
    - ``dynamic_weights`` over ``dynamic_balance`` modalities: EMA decay ``beta``, exponent ``gamma``,
      weights clipped to ``weight_clip`` = (w_min, w_max).
    - ``init_weights``: True = B zero (the model is unchanged at step 0); False = random B (tests).
    """

    modalities: list[str] = field(default_factory=lambda: list(DEFAULT_MODALITIES))
    adapted_modalities: list[str] | None = None
    r: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    num_experts: int = 4
    top_k: int = 1
    routing: str = "token"
    target_modules: list[str] | str | None = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: list[str] | str | None = None
    dropout: float = 0.0
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    dynamic_weights: bool = True
    dynamic_balance: list[str] = field(default_factory=lambda: ["visual", "audio"])
    beta: float = 0.9
    gamma: float = 1.0
    weight_clip: list[float] = field(default_factory=lambda: [0.5, 2.0])
    router_init_std: float = 0.02
    init_weights: bool = True
    # Fields PEFT's injection reads (kept at their neutral values).
    target_parameters: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self.modalities = list(check_modality_names("MoSEConfig.modalities", self.modalities))
        if self.adapted_modalities is not None:
            modality_indices("MoSEConfig.adapted_modalities", self.adapted_modalities, self.modalities)
            self.adapted_modalities = list(self.adapted_modalities)
        for name in ("r", "num_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"MoSEConfig.{name}: expected a positive int, got {value!r}")
        if self.top_k not in (1, 2) or isinstance(self.top_k, bool) or self.top_k > self.num_experts:
            raise ValueError(f"MoSEConfig.top_k: expected 1 or 2 and <= num_experts={self.num_experts}, got "
                             f"{self.top_k!r}")
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"MoSEConfig.routing: expected one of {ROUTING_MODES}, got {self.routing!r}")
        self.alpha = _real("MoSEConfig.alpha", self.alpha)
        self.dropout = _real("MoSEConfig.dropout", self.dropout, low=0.0, high=0.999)
        self.load_balance_coef = _real("MoSEConfig.load_balance_coef", self.load_balance_coef, low=0.0)
        self.z_loss_coef = _real("MoSEConfig.z_loss_coef", self.z_loss_coef, low=0.0)
        self.beta = _real("MoSEConfig.beta", self.beta, low=0.0, high=1.0)
        self.gamma = _real("MoSEConfig.gamma", self.gamma, low=0.0)
        self.router_init_std = _real("MoSEConfig.router_init_std", self.router_init_std, low=0.0)
        clip = list(self.weight_clip) if not isinstance(self.weight_clip, (str, bytes)) else None
        if clip is None or len(clip) != 2 or not 0 < _real("MoSEConfig.weight_clip[0]", clip[0]) \
                <= _real("MoSEConfig.weight_clip[1]", clip[1]):
            raise ValueError("MoSEConfig.weight_clip: expected (w_min, w_max) with 0 < w_min <= w_max, got "
                             f"{self.weight_clip!r}")
        self.weight_clip = [float(clip[0]), float(clip[1])]
        balance = modality_indices("MoSEConfig.dynamic_balance", self.dynamic_balance, self.modalities)
        not_adapted = set(balance) - set(self.adapted_ids())
        if self.dynamic_weights and not_adapted:
            raise ValueError("MoSEConfig.dynamic_balance: "
                             f"{[self.modalities[m] for m in sorted(not_adapted)]} have no adapter; list "
                             "only adapted modalities (or set dynamic_weights=False)")
        self.dynamic_balance = list(self.dynamic_balance)
        if not isinstance(self.target_modules, (str, list, set, tuple)) or not self.target_modules:
            raise ValueError("MoSEConfig.target_modules: expected module names or a regex, got "
                             f"{self.target_modules!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = list(self.target_modules)

    def adapted_ids(self) -> tuple[int, ...]:
        """Ids of the modalities with an adapter, ascending."""
        if self.adapted_modalities is None:
            return tuple(range(len(self.modalities)))
        return tuple(sorted(modality_indices("MoSEConfig.adapted_modalities", self.adapted_modalities,
                                             self.modalities)))

    def balance_ids(self) -> tuple[int, ...]:
        return modality_indices("MoSEConfig.dynamic_balance", self.dynamic_balance, self.modalities)

    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    def adapter_kwargs(self) -> dict:
        """Keyword arguments of ``MoSEAdapter`` for this config."""
        return dict(
            num_modalities=len(self.modalities), adapted=self.adapted_ids(), r=self.r, scale=self.scale(),
            num_experts=self.num_experts, top_k=self.top_k, routing=self.routing, dropout=self.dropout,
            dynamic_weights=self.dynamic_weights,
            balance=self.balance_ids() if self.dynamic_weights else (), beta=self.beta, gamma=self.gamma,
            weight_clip=tuple(self.weight_clip), load_balance_coef=self.load_balance_coef,
            z_loss_coef=self.z_loss_coef, router_init_std=self.router_init_std,
            init_weights=self.init_weights)


from . import peft_method as _peft_method  # noqa: E402,F401  (registers MoSE with PEFT)
