"""Setup factories shared by the providers: inputs for one case, and the measured closure.

``mose_setup(update)`` turns ``update(x, modality, expert, gate, A, B, scale, out) -> y`` into a
provider setup for the modes "update" (the adapter alone), "fwd" (base ``F.linear`` + update, no
autograd) and "fwd_bwd" (forward and backward with the base weight frozen: its backward is dx only).
``ar_setup(attend)`` does the same for ``attend(q, k, v, key_modality) -> o`` (mode "fwd").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.cases import make_ar_inputs, make_mose_inputs

AR_OPTIONS = dict(num_modalities=3, balance=(1, 2), strength=0.5)


def mose_inputs(case):
    inputs = make_mose_inputs(case["n_tokens"], case["d_in"], case["d_out"], n_modalities=case["n_modalities"],
                              n_experts=case["n_experts"], rank=case["rank"], top_k=case["top_k"],
                              dtype=case["dtype"], device=case["device"], with_out=False, pad_fraction=0.0)
    weight = torch.randn(case["d_out"], case["d_in"], device=case["device"]).mul(case["d_in"] ** -0.5)
    return inputs, weight.to(case["dtype"])


def mose_setup(update=None, *, layer=None):
    """A provider setup from ``update(x, modality, expert, gate, A, B, scale, out) -> out + update``,
    or from ``layer(x, W, modality, expert, gate, A, B, scale) -> x W^T + update`` (a fused base and
    adapter, which has no "update" mode)."""
    if layer is None:
        def layer(x, weight, *routing_and_weights):
            return update(x, *routing_and_weights, F.linear(x, weight))

    def setup(case):
        inputs, weight = mose_inputs(case)
        names = ("x", "modality", "expert", "gate", "A", "B", "scale")
        args = [inputs[n] for n in names]
        mode = case["mode"]
        if mode == "update":
            if update is None:
                raise ValueError("mode: 'update' needs the adapter alone; this provider fuses it with the base")
            return lambda: update(*args, None)
        if mode == "fwd":
            def forward():
                with torch.no_grad():
                    return layer(args[0], weight, *args[1:])
            return forward
        if mode != "fwd_bwd":
            raise ValueError(f"mode: expected 'update', 'fwd' or 'fwd_bwd', got {mode!r}")
        for i in (0, 3, 4, 5):  # x, gate, A, B are trained / need gradients; W is frozen
            args[i] = args[i].detach().requires_grad_(True)
        grad = torch.randn(case["n_tokens"], case["d_out"], device=case["device"], dtype=case["dtype"])

        def step():
            layer(args[0], weight, *args[1:]).backward(grad)
            for i in (0, 3, 4, 5):
                args[i].grad = None
        return step
    return setup


def linear_floor(case):
    """The frozen base layer alone: F.linear, and its dx-only backward in fwd_bwd."""
    inputs, weight = mose_inputs(case)
    x = inputs["x"]
    if case["mode"] != "fwd_bwd":
        return lambda: F.linear(x, weight)
    x = x.detach().requires_grad_(True)
    grad = torch.randn(case["n_tokens"], case["d_out"], device=case["device"], dtype=case["dtype"])

    def step():
        F.linear(x, weight).backward(grad)
        x.grad = None
    return step


def ar_inputs(case):
    return make_ar_inputs(case["batch"], case["n_q_heads"], case["n_kv_heads"], case["len_q"], case["len_k"],
                          case["head_dim"], dtype=case["dtype"], device=case["device"], layout="av")


def ar_setup(attend):
    def setup(case):
        if case["mode"] != "fwd":
            raise ValueError(f"mode: AR benchmarks are inference ('fwd'), got {case['mode']!r}")
        inputs = ar_inputs(case)
        args = [inputs[n] for n in ("q", "k", "v", "key_modality")]
        return lambda: attend(*args)
    return setup


def cuda_only(case):
    return None if case["device"].type == "cuda" else "needs a CUDA device (the Triton interpreter is not timed)"
