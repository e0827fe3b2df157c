"""MoSELinear alone: exact start, the DESIGN 2.1 formula, routing, regularizers, dynamic weights."""

import math

import pytest
import torch
from torch import nn

from mosear_fast import MoSELinear
from mosear_fast.kernels.mose.reference import mose_lora_reference


def make_layer(d_in=8, d_out=6, *, adapted=(0, 1, 2), init_weights=False, seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(num_modalities=3, adapted=adapted, r=4, scale=0.5, num_experts=3, top_k=1,
                   init_weights=init_weights, router_init_std=0.5, balance=(1, 2))
    options.update(kwargs)
    return MoSELinear(nn.Linear(d_in, d_out), **options)


def manual_output(layer, x, modality, sample=None):
    """DESIGN 2.1 written out per token (float64): routing, gates, s * w_m, the experts' sum."""
    adapter = layer.mose_adapter["default"]
    x64 = x.double()
    y = layer.base_layer(x).double()
    slot_of = {m: i for i, m in enumerate(adapter.adapted)}
    for t in range(x.shape[0]):
        m = int(modality[t])
        if m not in slot_of:
            continue
        s = slot_of[m]
        if adapter.routing == "token":
            router_in = x64[t]
        else:
            same = (modality == m) & (sample == sample[t])
            router_in = x64[same].mean(0)
        z = adapter.router_weight[s].double() @ router_in + adapter.router_bias[s].double()
        p = torch.softmax(z, 0)
        top_p, top_e = p.topk(adapter.top_k)
        gates = top_p if adapter.top_k == 1 else top_p / top_p.sum()
        h = adapter.A[s].double() @ x64[t]
        update = sum(g * (adapter.B[s, e].double() @ h) for g, e in zip(gates, top_e, strict=True))
        y[t] += adapter.scale * float(adapter.modality_weight[m]) * update
    return y


def test_fresh_adapter_is_the_base_layer_exactly():
    layer = make_layer(init_weights=True)
    x = torch.randn(2, 5, 8)
    modality = torch.randint(-1, 3, (2, 5))
    assert torch.equal(layer(x, modality=modality), layer.base_layer(x))


@pytest.mark.parametrize("top_k", [1, 2])
def test_token_routing_matches_the_formula(top_k):
    layer = make_layer(top_k=top_k, adapted=(1, 2)).eval()  # text (0) unadapted: base output
    x = torch.randn(20, 8)
    modality = torch.randint(-1, 3, (20,))
    y = layer(x, modality=modality)
    expected = manual_output(layer, x, modality)
    update = (y.double() - layer.base_layer(x).double())
    ref_update = expected - layer.base_layer(x).double()
    assert torch.linalg.norm(update - ref_update) / torch.linalg.norm(ref_update) < 1e-5
    untouched = ~torch.isin(modality, torch.tensor([1, 2]))
    assert torch.equal(y[untouched], layer.base_layer(x)[untouched])


def test_sequence_routing_routes_each_sample_modality_on_its_mean():
    layer = make_layer(routing="sequence", top_k=2).eval()
    x = torch.randn(3, 7, 8)
    modality = torch.randint(-1, 3, (3, 7))
    y = layer(x, modality=modality)
    sample = torch.arange(3).repeat_interleave(7)
    expected = manual_output(layer, x.reshape(-1, 8), modality.reshape(-1), sample)
    base = layer.base_layer(x).reshape(-1, 6).double()
    update = y.reshape(-1, 6).double() - base
    assert torch.linalg.norm(update - (expected - base)) / torch.linalg.norm(expected - base) < 1e-5


def test_update_goes_through_mose_lora_with_scale_times_weight():
    layer = make_layer().eval()
    adapter = layer.mose_adapter["default"]
    adapter.modality_weight.copy_(torch.tensor([1.0, 1.5, 0.7]))
    x = torch.randn(16, 8)
    modality = torch.randint(0, 3, (16,))
    y = layer(x, modality=modality)
    logits = torch.einsum("nd,ned->ne", x, adapter.router_weight[modality]) + adapter.router_bias[modality]
    probs = torch.softmax(logits, -1)
    gate, expert = probs.max(-1, keepdim=True)
    ref = mose_lora_reference(x, modality, expert, gate, adapter.A, adapter.B, 0.5 * adapter.modality_weight,
                              layer.base_layer(x))
    assert torch.allclose(y.double(), ref.double(), atol=1e-5)


def hand_layer(routing="token", top_k=1):
    """d_in = 2, E = 2, two adapted modalities with identity / swapped routers (logits known by hand)."""
    layer = MoSELinear(nn.Linear(2, 3), num_modalities=3, adapted=(1, 2), r=2, scale=1.0, num_experts=2,
                       top_k=top_k, routing=routing, init_weights=False, dynamic_weights=False)
    with torch.no_grad():
        adapter = layer.mose_adapter["default"]
        adapter.router_weight.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]))
        adapter.router_bias.zero_()
    return layer.train()


def softmax2(a, b):
    ea, eb = math.exp(a), math.exp(b)
    return ea / (ea + eb), eb / (ea + eb)


def lse2(a, b):
    return math.log(math.exp(a) + math.exp(b))


def test_regularizers_match_hand_computed_values_token_routing():
    layer = hand_layer()
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.5], [3.0, 1.0], [0.0, 0.0]])
    modality = torch.tensor([1, 1, 1, 2, 0])  # text (0) has no adapter: not a routing unit
    layer(x, modality=modality)
    regs = layer.mose_adapter["default"].last_regularizers
    # modality 1 (identity router): logits = x; top-1 experts 0, 1, 0 -> f = (2/3, 1/3)
    p1 = [softmax2(2, 0), softmax2(0, 1), softmax2(1, 0.5)]
    P1 = [sum(p[e] for p in p1) / 3 for e in range(2)]
    lb1 = 2 * (2 / 3 * P1[0] + 1 / 3 * P1[1])
    # modality 2 (swapped router): logits = (1, 3); expert 1 -> f = (0, 1)
    p2 = softmax2(1, 3)
    lb2 = 2 * (0 * p2[0] + 1 * p2[1])
    z = [lse2(2, 0), lse2(0, 1), lse2(1, 0.5), lse2(1, 3)]
    assert regs["load_balance"].item() == pytest.approx((lb1 + lb2) / 2, rel=1e-6)
    assert regs["z_loss"].item() == pytest.approx(sum(v * v for v in z) / 4, rel=1e-6)


def test_regularizers_top2_and_sequence_units_by_hand():
    layer = hand_layer(routing="sequence", top_k=2)
    # sample 0: modality 1 tokens mean (1, 0.5); sample 1: modality 1 mean (0, 2); no modality 2 at all
    x = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]], [[0.0, 1.0], [0.0, 3.0], [1.0, 1.0]]])
    modality = torch.tensor([[1, 1, 0], [1, 1, -1]])
    layer(x, modality=modality)
    regs = layer.mose_adapter["default"].last_regularizers
    units = [softmax2(1.0, 0.5), softmax2(0.0, 2.0)]  # one unit per (sample, modality)
    P = [(units[0][e] + units[1][e]) / 2 for e in range(2)]
    lb = 2 * (0.5 * P[0] + 0.5 * P[1])  # top-2 of 2 experts: each choice counts 1/2
    z = (lse2(1.0, 0.5) ** 2 + lse2(0.0, 2.0) ** 2) / 2
    assert regs["load_balance"].item() == pytest.approx(lb, rel=1e-6)
    assert regs["z_loss"].item() == pytest.approx(z, rel=1e-6)


def test_regularizers_are_differentiable_and_absent_in_eval():
    layer = hand_layer()
    x = torch.randn(6, 2)
    layer(x, modality=torch.tensor([1, 2, 1, 2, 1, 0]))
    regs = layer.mose_adapter["default"].last_regularizers
    (regs["load_balance"] + regs["z_loss"]).backward()
    assert layer.mose_adapter["default"].router_weight.grad.abs().sum() > 0
    layer.eval()
    layer(x, modality=torch.tensor([1, 2, 1, 2, 1, 0]))
    assert layer.mose_adapter["default"].last_regularizers is None


def raw_update_norms(layer, x, modality, m):
    """Mean L2 norm over tokens of modality m of sum_e g B(A x) (before s * w_m), from the formula."""
    adapter = layer.mose_adapter["default"]
    w = float(adapter.modality_weight[m])
    update = manual_output(layer, x, modality) - layer.base_layer(x).double()
    return (update[modality == m].norm(dim=-1) / (adapter.scale * w)).mean().item()


def test_dynamic_weights_follow_the_ema_and_freeze_in_eval():
    layer = make_layer(beta=0.8, gamma=0.5, weight_clip=(0.5, 2.0), top_k=2).train()
    adapter = layer.mose_adapter["default"]
    with torch.no_grad():
        adapter.B[2] *= 3.0  # audio updates larger than visual: audio weight goes down
    x1, m1 = torch.randn(30, 8), torch.randint(0, 3, (30,))
    c1 = {m: raw_update_norms(layer, x1, m1, m) for m in (1, 2)}
    layer(x1, modality=m1)
    ema = {m: 0.2 * c1[m] for m in (1, 2)}
    assert adapter.update_norm_ema[1].item() == pytest.approx(ema[1], rel=1e-5)
    assert adapter.update_norm_ema[2].item() == pytest.approx(ema[2], rel=1e-5)
    text_ema = 0.2 * raw_update_norms(layer, x1, m1, 0)
    assert adapter.update_norm_ema[0].item() == pytest.approx(text_ema, rel=1e-5)

    def expected_weight(m):
        cbar = (ema[1] + ema[2]) / 2
        return min(2.0, max(0.5, (cbar / ema[m]) ** 0.5))

    assert adapter.modality_weight[1].item() == pytest.approx(expected_weight(1), rel=1e-5)
    assert adapter.modality_weight[2].item() == pytest.approx(expected_weight(2), rel=1e-5)
    assert adapter.modality_weight[2] < 1 < adapter.modality_weight[1]
    assert adapter.modality_weight[0].item() == 1.0  # text is outside the balance set

    # Second step: the norms are measured before the (now non-unit) weights are applied.
    x2, m2 = torch.randn(30, 8), torch.randint(0, 3, (30,))
    c2 = {m: raw_update_norms(layer, x2, m2, m) for m in (1, 2)}
    layer(x2, modality=m2)
    ema = {m: 0.8 * ema[m] + 0.2 * c2[m] for m in (1, 2)}
    assert adapter.update_norm_ema[1].item() == pytest.approx(ema[1], rel=1e-5)
    assert adapter.modality_weight[2].item() == pytest.approx(expected_weight(2), rel=1e-5)

    frozen = adapter.modality_weight.clone(), adapter.update_norm_ema.clone()
    layer.eval()
    layer(torch.randn(30, 8), modality=torch.randint(0, 3, (30,)))
    assert torch.equal(adapter.modality_weight, frozen[0]) and torch.equal(adapter.update_norm_ema, frozen[1])
    state = layer.state_dict()
    assert "mose_adapter.default.modality_weight" in state and "mose_adapter.default.update_norm_ema" in state


def test_dynamic_weights_stay_one_while_a_balance_modality_is_unmeasured():
    layer = make_layer(init_weights=True).train()  # B = 0: every update norm is 0
    adapter = layer.mose_adapter["default"]
    layer(torch.randn(12, 8), modality=torch.randint(0, 3, (12,)))
    assert torch.equal(adapter.update_norm_ema, torch.zeros(3))
    assert torch.equal(adapter.modality_weight, torch.ones(3))
    layer2 = make_layer().train()
    layer2(torch.randn(12, 8), modality=torch.tensor([1] * 6 + [0] * 6))  # no audio yet
    assert layer2.mose_adapter["default"].update_norm_ema[1] > 0
    assert torch.equal(layer2.mose_adapter["default"].modality_weight, torch.ones(3))


def test_dropout_applies_to_the_adapter_input_only():
    layer = make_layer(dropout=0.5, dynamic_weights=False).train()
    x = torch.randn(10, 8)
    modality = torch.randint(0, 3, (10,))
    torch.manual_seed(123)
    y = layer(x, modality=modality)
    torch.manual_seed(123)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    layer.eval()
    adapter = layer.mose_adapter["default"]
    # The same routing (from x) with the dropped input in the adapter path:
    probs = torch.softmax(torch.einsum("nd,ned->ne", x, adapter.router_weight[modality])
                          + adapter.router_bias[modality], -1)
    gate, expert = probs.max(-1, keepdim=True)
    ref = mose_lora_reference(dropped, modality, expert, gate, adapter.A, adapter.B,
                              0.5 * adapter.modality_weight, layer.base_layer(x))
    assert torch.allclose(y.double(), ref.double(), atol=1e-5)


def test_gradients_reach_adapter_and_router_not_the_base():
    layer = make_layer().train()
    x = torch.randn(4, 5, 8, requires_grad=True)
    modality = torch.randint(0, 3, (4, 5))
    layer(x, modality=modality).square().sum().backward()
    adapter = layer.mose_adapter["default"]
    for p in (adapter.A, adapter.B, adapter.router_weight, adapter.router_bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None and x.grad is not None


def test_modality_shape_must_match_the_input():
    layer = make_layer()
    with pytest.raises(ValueError, match="modality"):
        layer(torch.randn(2, 5, 8), modality=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="modality"):
        layer(torch.randn(2, 5, 8))  # no ids and no model context


def test_a_layer_can_be_copied_after_a_training_forward():
    """The last forward's graph (regularizers, measured scale) is not part of a copy."""
    import copy

    layer = make_layer(load_balance_coef=0.1, z_loss_coef=0.01)
    layer.train()
    x, modality = torch.randn(10, 8), torch.tensor([0, 1, 2, 1, 2, 0, 1, 2, 1, 2])
    layer(x, modality=modality)
    assert layer.mose_adapter["default"].last_regularizers is not None
    twin = copy.deepcopy(layer)
    assert twin.mose_adapter["default"].last_regularizers is None
    layer.eval(), twin.eval()
    assert torch.equal(twin(x, modality=modality), layer(x, modality=modality))


def test_directly_given_ids_out_of_range_raise():
    layer = make_layer()
    with pytest.raises(ValueError, match="modality"):
        layer(torch.randn(4, 8), modality=torch.tensor([0, 1, 3, -1]))


# ---------------------------------------------------------------------------------------------------
# Fused (mose_linear) and unfused (base layer + mose_lora) paths of MoSELinear agree
# ---------------------------------------------------------------------------------------------------


def _twin_layers(**kwargs):
    """The same layer twice: one fusing base + update (the default), one with fuse_base off."""
    fused = make_layer(**kwargs)
    unfused = make_layer(**kwargs)
    unfused.load_state_dict(fused.state_dict())
    unfused.fuse_base = False
    return fused, unfused


def _step(layer, x, modality, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x, modality=modality)
    y.backward(dy)
    adapter = layer.mose_adapter["default"]
    grads = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    grads["x"] = x.grad
    return y.detach(), grads


def _assert_same(a, b, what):
    assert torch.isfinite(a).all(), what
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"{what}: max diff {(a - b).abs().max():.3e}"


@pytest.mark.parametrize("routing", ["token", "sequence"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_fused_and_unfused_paths_agree_in_training(routing, top_k, monkeypatch):
    """Outputs, gradients of x, A, B and the routers, and the dynamic-weight buffers (three steps)."""
    from mosear_fast import mose_layer

    calls = []
    monkeypatch.setattr(mose_layer, "mose_linear", _counting(mose_layer.mose_linear, calls))
    fused, unfused = _twin_layers(top_k=top_k, routing=routing, beta=0.5)
    fused.train(), unfused.train()
    for step in range(3):
        x, modality = torch.randn(2, 9, 8), torch.randint(-1, 3, (2, 9))
        dy = torch.randn(2, 9, 6)
        y_f, g_f = _step(fused, x, modality, dy)
        y_u, g_u = _step(unfused, x, modality, dy)
        _assert_same(y_f, y_u, f"output, step {step}")
        for name in g_u:
            _assert_same(g_f[name], g_u[name], f"grad {name}, step {step}")
        for name in ("update_norm_ema", "modality_weight"):
            buf_f, buf_u = getattr(fused.mose_adapter["default"], name), getattr(unfused.mose_adapter["default"], name)
            _assert_same(buf_f, buf_u, f"{name}, step {step}")
        for layer in (fused, unfused):
            layer.zero_grad()
    assert calls == [True] * 3  # the fused layer went through mose_linear (with norms), the unfused one did not
    assert fused.mose_adapter["default"].update_norm_ema[1:].gt(0).all()  # the weights really moved


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(kwargs.get("return_update_norm"))
        return fn(*args, **kwargs)
    return wrapped


def test_fused_path_in_eval_and_unfused_with_dropout_in_training(monkeypatch):
    from mosear_fast import mose_layer

    calls = []
    monkeypatch.setattr(mose_layer, "mose_linear", _counting(mose_layer.mose_linear, calls))
    fused, unfused = _twin_layers(top_k=2, dropout=0.3)
    x, modality = torch.randn(3, 5, 8), torch.randint(-1, 3, (3, 5))
    fused.eval(), unfused.eval()  # dropout is off in eval: the fused path serves
    _assert_same(fused(x, modality=modality), unfused(x, modality=modality), "eval output")
    assert calls == [False]
    fused.train()
    torch.manual_seed(5)
    y = fused(x, modality=modality)  # dropout on: base layer + mose_lora on dropout(x)
    assert calls == [False] and torch.isfinite(y).all()


def test_fused_path_under_gradient_checkpointing_updates_the_weights_once():
    """A checkpointed forward reruns the layer in backward with the same forward id: the rerun uses
    the weights of the first run and updates nothing, on both paths, and the gradients agree."""
    from torch.utils.checkpoint import checkpoint

    from mosear_fast.context import ModalityContext

    results = {}
    for fuse in (True, False):
        layer = make_layer(top_k=2, beta=0.5).train()
        layer.fuse_base = fuse
        context = ModalityContext(("text", "visual", "audio"))
        layer._mosear_context = context
        ema_after = []
        for step in range(2):
            torch.manual_seed(step)
            ids = torch.randint(-1, 3, (2, 7))
            context.begin_forward(ids, batch=2, q_len=7, past=0, attention_mask=None, device="cpu")
            x = torch.randn(2, 7, 8, requires_grad=True)
            y = checkpoint(layer, x, use_reentrant=False)
            ema_after.append(layer.mose_adapter["default"].update_norm_ema.clone())
            y.square().sum().backward()  # reruns the layer's forward
            assert torch.equal(layer.mose_adapter["default"].update_norm_ema, ema_after[-1])
        grads = {n: p.grad for n, p in layer.mose_adapter["default"].named_parameters()}
        results[fuse] = (ema_after, grads, layer.mose_adapter["default"].modality_weight.clone())
    for a, b in zip(results[True][0], results[False][0], strict=True):
        _assert_same(a, b, "ema")
    _assert_same(results[True][2], results[False][2], "modality weight")
    for name, grad in results[False][1].items():
        _assert_same(results[True][1][name], grad, f"grad {name}")


def test_the_layer_module_does_not_shadow_the_mose_linear_op():
    import mosear_fast
    from mosear_fast.ops import mose_linear

    assert mosear_fast.MoSELinear is MoSELinear  # the layer's module is imported
    assert mosear_fast.mose_linear is mose_linear


def test_fused_path_borrows_the_base_weight_and_saves_the_same_state():
    layer = make_layer()
    assert set(layer.state_dict()) == set(_twin_layers()[1].state_dict())
    assert layer.base_layer.weight.requires_grad is False
    hooked = make_layer()
    seen = []
    hooked.base_layer.register_forward_hook(lambda *_: seen.append(1))
    hooked(torch.randn(4, 8), modality=torch.tensor([0, 1, 2, -1]))
    assert seen == [1]  # a hooked base layer is called (unfused path), its hook runs
