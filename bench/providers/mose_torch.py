"""MoSE providers that run anywhere: the floor, the PyTorch backend and the eager baselines.

``peft_lora`` is PEFT's own LoRA layer (``peft.tuners.lora.Linear``) with one adapter of the same
rank on the same frozen base: what a single, unrouted LoRA costs (the bar a MoSE CPU path should meet).
"""

from functools import partial

import torch
from torch import nn

from mosear_fast import mose_linear, mose_lora
from tests.baselines import mose_dense_masked, mose_naive_group_loop

from ..registry import Provider, register
from ..setups import linear_floor, mose_inputs, mose_setup


def _fused_unavailable(case: dict) -> str | None:
    return "fuses the adapter with the base GEMM: no update-only mode" if case["mode"] == "update" else None


def peft_lora_setup(case):
    """PEFT's LoRA ``Linear`` (rank r, no dropout, random A and B) around the frozen base weight."""
    from peft import LoraConfig  # imported when timed: peft is slow to import
    from peft.tuners.lora import Linear as LoraLinear

    inputs, weight = mose_inputs(case)
    base = nn.Linear(case["d_in"], case["d_out"], bias=False, device=case["device"], dtype=case["dtype"])
    with torch.no_grad():
        base.weight.copy_(weight)
    base.requires_grad_(False)
    config = LoraConfig(r=case["rank"], lora_alpha=2 * case["rank"], lora_dropout=0.0, init_lora_weights=False)
    layer = LoraLinear(base, "default", config, r=config.r, lora_alpha=config.lora_alpha,
                       lora_dropout=0.0, init_lora_weights=False).to(device=case["device"], dtype=case["dtype"])
    x = inputs["x"]
    if case["mode"] == "update":
        lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
        return lambda: lora_b(lora_a(x)) * layer.scaling["default"]
    if case["mode"] == "fwd":
        def forward():
            with torch.no_grad():
                return layer(x)
        return forward
    x = x.detach().requires_grad_(True)
    trained = [x, *layer.lora_A["default"].parameters(), *layer.lora_B["default"].parameters()]
    grad = torch.randn(case["n_tokens"], case["d_out"], device=case["device"], dtype=case["dtype"])

    def step():
        layer(x).backward(grad)
        for t in trained:
            t.grad = None
    return step


register(Provider("mose", "linear", linear_floor, description="base F.linear alone (floor)"))
register(Provider("mose", "mosear_torch", mose_setup(partial(mose_lora, backend="torch")),
                  description="F.linear + mose_lora(out=base), PyTorch backend (grouped matmuls)"))
register(Provider("mose", "mosear_linear_torch",
                  mose_setup(layer=lambda x, weight, *rest: mose_linear(x, weight, None, *rest, backend="torch")),
                  unavailable=_fused_unavailable,
                  description="mose_linear (base + update in one autograd Function), PyTorch backend"))
register(Provider("mose", "naive_loop", mose_setup(mose_naive_group_loop),
                  description="per-(modality, expert) loop: index_select, matmul, index_add_"))
register(Provider("mose", "peft_lora", peft_lora_setup,
                  description="PEFT's LoRA Linear, one adapter of the same rank on the same base (no routing)"))
register(Provider("mose", "dense_masked", mose_setup(mose_dense_masked),
                  description="every expert on every token, masked by a dense gate"))
