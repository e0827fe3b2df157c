"""MoSE as a PEFT method: ``peft.get_peft_model(model, MoSEConfig(...))``.

``MoSETunerLinear`` is ``MoSELinear`` plus PEFT's ``BaseTunerLayer`` bookkeeping (adapters keyed by
name in ``mose_adapter``, active adapter, enable/disable), so PEFT's generic machinery selects,
freezes, saves and loads exactly the adapter tensors (A, B, routers and the dynamic-weight buffers).
``MoSEModel`` injects it into the target ``nn.Linear`` modules of the language model (not those of a
vision or audio encoder, whose inputs carry no modality ids) and installs the modality context.

PEFT 0.21's ``register_peft_method`` only accepts members of its closed ``PeftType`` enum, so the
method is registered under the string type "MOSE" directly in PEFT's registries (PEFT supports
string peft types for custom methods). Importing ``mosear_fast.mose_config`` does this.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .context import ensure_context, language_model_modules, share_context
from .mose_config import PEFT_TYPE, MoSEConfig
from .mose_layer import MoSELinear

PREFIX = "mose_"


class MoSETunerLinear(MoSELinear, BaseTunerLayer):
    """``MoSELinear`` as a PEFT tuner layer."""

    adapter_layer_names = ("mose_adapter",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: MoSEConfig):
        MoSELinear.__init__(self, base_layer, adapter_name)
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: MoSEConfig) -> None:
        self.add_adapter(adapter_name, **config.adapter_kwargs())
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError("merge: MoSE routes every token to its own experts, so it cannot be merged into "
                         "the base weight; keep the adapter unmerged (or use unload() to drop it)")

    def unmerge(self) -> None:
        return None


class MoSEModel(BaseTuner):
    """Injects ``MoSETunerLinear`` into the ``target_modules`` of a model (see ``MoSEConfig``)."""

    prefix: str = PREFIX
    tuner_layer_cls = MoSETunerLinear
    target_module_mapping: dict = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if id(target) not in self._language_model_modules():
            return  # an encoder's or projector's linear: its inputs are not tokens with modality ids
        if isinstance(target, MoSETunerLinear):
            target.update_layer(adapter_name, config)
            return
        if not isinstance(target, nn.Linear):
            raise ValueError(f"MoSEConfig.target_modules: {current_key!r} is a {type(target).__name__}; "
                             "MoSE wraps nn.Linear modules only, so name linear layers (e.g. 'q_proj', "
                             "'v_proj')")
        new_module = MoSETunerLinear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trained
        self._replace_module(parent, target_name, new_module, target)

    def _language_model_modules(self) -> set[int]:
        cached = self.__dict__.get("_language_ids")
        if cached is None:
            cached = self.__dict__["_language_ids"] = language_model_modules(self.model)
        return cached

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, MoSEConfig):
            raise TypeError(f"config: expected a MoSEConfig, got {type(config).__name__}")

    def _post_injection_hook(self, model, config, adapter_name) -> None:
        context = ensure_context(model, config.modalities)
        share_context(model, context)


def _register() -> None:
    if PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = MoSEConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = MoSEModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX


_register()
