"""Triton backend of ``mose_lora``: forward and every gradient against the float64 reference.

On a machine without CUDA the kernels run through the Triton interpreter on CPU tensors (set up by
conftest.py), so shapes are small; they still cover token-block and feature tails, several blocks,
empty groups, padding rows, top-1 and top-2, every dtype and ranks that need padding for tl.dot.
With CUDA the same tests run compiled.
"""

from __future__ import annotations

import pytest
import torch

from mosear_fast import mose_lora
from mosear_fast.kernels.mose import launch
from mosear_fast.kernels.mose.function import mose_linear_triton, mose_lora_triton
from mosear_fast.kernels.mose.reference import mose_lora_reference
from mosear_fast.tolerances import assert_close, rel_error
from tests.cases import make_mose_inputs
from tests.triton_compile import compile_kernels

GRAD_NAMES = ("x", "gate", "A", "B", "out")


def _scale_vec(inputs, device):
    scale, n_modalities = inputs["scale"], inputs["A"].shape[0]
    if isinstance(scale, torch.Tensor):
        return scale.to(device=device, dtype=torch.float32)
    return torch.full((n_modalities,), float(scale), dtype=torch.float32, device=device)


def _run(inputs, dy=None, *, grads=GRAD_NAMES, direct=False, **kwargs):
    """Forward (and backward with ``dy``) of the Triton backend; returns (y, {name: grad})."""
    leaves = {n: inputs[n].detach().clone().requires_grad_(n in grads)
              for n in GRAD_NAMES if inputs[n] is not None}
    args = (leaves["x"], inputs["modality"], inputs["expert"], leaves["gate"], leaves["A"], leaves["B"])
    out = leaves.get("out")
    if direct:  # the entry point itself, bypassing validation (out-of-range ids on the CPU)
        y = mose_lora_triton(*args, _scale_vec(inputs, args[0].device), out, **kwargs)
    else:
        y = mose_lora(*args, inputs["scale"], out, backend="triton", **kwargs)
    result = {}
    if dy is not None:
        y.backward(dy)
        result = {n: t.grad for n, t in leaves.items() if n in grads}
    return y, result


def _reference(inputs, dy=None, *, modality=None, gate=None):
    """float64 reference result and gradients (every differentiable input)."""
    leaves = {n: inputs[n].detach().cpu().double().requires_grad_(True)
              for n in GRAD_NAMES if inputs[n] is not None}
    gate_arg = leaves["gate"] if gate is None else leaves["gate"] * gate.cpu().double()
    scale = inputs["scale"].cpu() if isinstance(inputs["scale"], torch.Tensor) else inputs["scale"]
    modality = inputs["modality"] if modality is None else modality
    y = mose_lora_reference(leaves["x"], modality.cpu(), inputs["expert"].cpu(), gate_arg, leaves["A"],
                            leaves["B"], scale, leaves.get("out"))
    grads = {}
    if dy is not None:
        y.backward(dy.detach().cpu().double())
        grads = {n: t.grad for n, t in leaves.items()}
    return y.detach(), grads


def _update(y, inputs):
    y = y.detach().cpu().double()
    return y - inputs["out"].cpu().double() if inputs["out"] is not None else y


def _check_all(inputs, y, grads, ref_y, ref_grads, dtype):
    assert y.dtype == dtype
    assert_close(_update(y, inputs), _update(ref_y, inputs), dtype, what="update")
    for name, grad in grads.items():
        if name == "out":
            continue
        assert grad is not None, name
        assert grad.dtype == inputs[name].dtype, name
        assert_close(grad, ref_grads[name], dtype, what=f"d{name}")


CASES = [
    # dtype, top_k, rank, n_modalities, n_experts
    (torch.float32, 1, 4, 3, 4),
    (torch.float32, 2, 16, 8, 16),
    (torch.float32, 2, 24, 3, 4),  # rank that is not a power of two
    (torch.float16, 2, 64, 3, 4),
    (torch.float16, 1, 8, 1, 1),
    (torch.bfloat16, 1, 16, 2, 16),
    (torch.bfloat16, 2, 4, 8, 2),
    (torch.bfloat16, 2, 64, 4, 8),
]


@pytest.mark.parametrize("dtype,top_k,rank,n_modalities,n_experts", CASES)
def test_forward_and_gradients_match_reference(device, dtype, top_k, rank, n_modalities, n_experts):
    # 150 tokens: three token blocks, the last one partial; d_in, d_out: feature tiles with tails
    inputs = make_mose_inputs(150, 100, 70, n_modalities=n_modalities, n_experts=n_experts, rank=rank,
                              top_k=top_k, dtype=dtype, device=device, seed=rank + top_k)
    dy = torch.randn(150, 70, device=device).to(dtype)
    y, grads = _run(inputs, dy)
    ref_y, ref_grads = _reference(inputs, dy)
    _check_all(inputs, y, grads, ref_y, ref_grads, dtype)
    assert torch.equal(grads["out"], dy)  # out's gradient is dy passed through


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_out_and_with_float_scale(device, dtype):
    inputs = make_mose_inputs(40, 33, 17, rank=8, top_k=2, dtype=dtype, device=device, with_out=False,
                              tensor_scale=False)
    dy = torch.randn(40, 17, device=device).to(dtype)
    y, grads = _run(inputs, dy)
    ref_y, ref_grads = _reference(inputs, dy)
    _check_all(inputs, y, grads, ref_y, ref_grads, dtype)
    padding = inputs["modality"] < 0
    assert padding.any() and torch.equal(y[padding], torch.zeros_like(y[padding]))


def test_padding_rows_equal_out_exactly(device):
    inputs = make_mose_inputs(90, 40, 50, rank=16, top_k=2, dtype=torch.bfloat16, device=device,
                              pad_fraction=0.4)
    y, _ = _run(inputs)
    padding = inputs["modality"] < 0
    assert padding.any() and (~padding).any()
    assert torch.equal(y[padding], inputs["out"][padding])
    assert not torch.equal(y[~padding], inputs["out"][~padding])


def test_empty_groups_and_absent_modalities(device):
    # experts 1 and 2 never selected; modality 1 absent
    inputs = make_mose_inputs(70, 40, 36, n_modalities=3, n_experts=4, rank=8, top_k=2, device=device,
                              unused_experts=(1, 2))
    inputs["modality"][inputs["modality"] == 1] = 2
    dy = torch.randn(70, 36, device=device)
    y, grads = _run(inputs, dy)
    ref_y, ref_grads = _reference(inputs, dy)
    _check_all(inputs, y, grads, ref_y, ref_grads, torch.float32)
    assert torch.equal(grads["B"][:, 1:3], torch.zeros_like(grads["B"][:, 1:3]))
    assert torch.equal(grads["A"][1], torch.zeros_like(grads["A"][1]))


@pytest.mark.parametrize("n_tokens,pad_fraction", [(0, 0.0), (1, 0.0), (1, 1.0), (20, 1.0)])
def test_degenerate_token_counts(device, n_tokens, pad_fraction):
    inputs = make_mose_inputs(n_tokens, 24, 20, rank=4, top_k=2, device=device, pad_fraction=pad_fraction)
    dy = torch.randn(n_tokens, 20, device=device)
    y, grads = _run(inputs, dy)
    ref_y, ref_grads = _reference(inputs, dy)
    assert y.shape == (n_tokens, 20)
    if n_tokens == 0 or pad_fraction == 1.0:  # no adapted token: y is out, the adapter gradients are 0
        assert torch.equal(y, inputs["out"])
        for name in ("x", "gate", "A", "B"):
            assert grads[name].shape == inputs[name].shape, name
            assert torch.equal(grads[name], torch.zeros_like(grads[name])), name
    else:
        _check_all(inputs, y, grads, ref_y, ref_grads, torch.float32)


def test_inplace_writes_into_out(device):
    inputs = make_mose_inputs(80, 40, 30, rank=16, top_k=2, dtype=torch.float16, device=device)
    expected, _ = _run(inputs, grads=())
    target = inputs["out"].clone()
    args = (inputs["x"], inputs["modality"], inputs["expert"], inputs["gate"], inputs["A"], inputs["B"])
    result = mose_lora(*args, inputs["scale"], target, inplace=True, backend="triton")
    assert result is target
    assert torch.equal(target, expected)

    # inplace with gradients to the adapter inputs (out itself does not require grad)
    dy = torch.randn(80, 30, device=device).to(torch.float16)
    target = inputs["out"].clone()
    leaves = {n: inputs[n].clone().requires_grad_(True) for n in ("x", "gate", "A", "B")}
    y = mose_lora(leaves["x"], inputs["modality"], inputs["expert"], leaves["gate"], leaves["A"], leaves["B"],
                  inputs["scale"], target, inplace=True, backend="triton")
    assert y is target
    y.backward(dy)
    _, ref_grads = _reference(inputs, dy)
    for name, leaf in leaves.items():
        assert_close(leaf.grad, ref_grads[name], torch.float16, what=f"d{name}")


def test_noncontiguous_inputs_and_expanded_grad(device):
    inputs = make_mose_inputs(60, 48, 40, rank=8, top_k=2, device=device)
    inputs["x"] = torch.randn(60, 96, device=device)[:, ::2]  # row stride 96, column stride 2
    inputs["out"] = torch.randn(40, 60, device=device).t()  # column-major
    inputs["expert"] = inputs["expert"].t().contiguous().t()
    inputs["modality"] = inputs["modality"].to(torch.int32)
    inputs["gate"] = inputs["gate"].double()  # any float dtype: used in fp32, grad in its own dtype
    leaves = {n: inputs[n].clone().requires_grad_(True) for n in GRAD_NAMES}
    y = mose_lora(leaves["x"], inputs["modality"], inputs["expert"], leaves["gate"], leaves["A"], leaves["B"],
                  inputs["scale"], leaves["out"], backend="triton")
    y.sum().backward()  # dy is an expanded (stride 0) tensor of ones
    ref_y, ref_grads = _reference(inputs, torch.ones(60, 40))
    assert_close(_update(y, inputs), _update(ref_y, inputs), torch.float32, what="update")
    for name in ("x", "gate", "A", "B"):
        assert leaves[name].grad.dtype == inputs[name].dtype
        assert_close(leaves[name].grad, ref_grads[name], torch.float32, what=f"d{name}")


@pytest.mark.parametrize("grads", [("B",), ("gate",), ("x", "out"), ("A",)])
def test_gradient_subsets(device, grads):
    inputs = make_mose_inputs(50, 40, 30, rank=16, top_k=2, device=device)
    dy = torch.randn(50, 30, device=device)
    _, got = _run(inputs, dy, grads=grads)
    _, ref_grads = _reference(inputs, dy)
    assert set(got) == set(grads)
    for name in grads:
        assert_close(got[name], ref_grads[name], torch.float32, what=f"d{name}")


def test_deterministic_backward_is_bit_identical(device, monkeypatch):
    inputs = make_mose_inputs(200, 40, 36, n_modalities=2, n_experts=2, rank=8, top_k=2,
                              dtype=torch.bfloat16, device=device)
    dy = torch.randn(200, 36, device=device).to(torch.bfloat16)
    first = _run(inputs, dy, deterministic=True)[1]
    second = _run(inputs, dy, deterministic=True)[1]
    for name in GRAD_NAMES:
        assert torch.equal(first[name], second[name]), name
    # the environment switch selects the same path when deterministic is left None
    monkeypatch.setenv("MOSEAR_DETERMINISTIC", "1")
    third = _run(inputs, dy)[1]
    for name in GRAD_NAMES:
        assert torch.equal(first[name], third[name]), name
    # the split (atomic) reduction computes the same gradients within the tolerance
    monkeypatch.setenv("MOSEAR_DETERMINISTIC", "0")
    split = _run(inputs, dy, deterministic=False)[1]
    _, ref_grads = _reference(inputs, dy)
    for name in ("A", "B"):
        assert_close(split[name], ref_grads[name], torch.bfloat16, what=f"d{name} (split)")


def test_out_of_range_ids_are_skipped(device):
    """With validation off (CUDA, validate=False), ids outside [0, M) / [0, E) must not be read:
    a token with an out-of-range modality keeps ``out``; a choice with an out-of-range expert
    contributes nothing (the token's other choice still does)."""
    n_modalities, n_experts = 3, 4
    inputs = make_mose_inputs(64, 40, 30, n_modalities=n_modalities, n_experts=n_experts, rank=8, top_k=2,
                              device=device, pad_fraction=0.0)
    modality, expert = inputs["modality"].clone(), inputs["expert"].clone()
    modality[:5] = torch.tensor([3, 100, -2, -100, 7])
    expert[10, 0], expert[11, 1], expert[12] = 4, -1, torch.tensor([50, -7])
    inputs = dict(inputs, modality=modality, expert=expert)
    dy = torch.randn(64, 30, device=device)
    y, grads = _run(inputs, dy, direct=True)

    skipped_rows = torch.zeros(64, dtype=torch.bool)
    skipped_rows[:5] = True
    pair_on = torch.ones(64, 2)
    pair_on[10, 0] = pair_on[11, 1] = pair_on[12, 0] = pair_on[12, 1] = 0
    safe_expert = expert.clamp(0, n_experts - 1)
    safe = dict(inputs, modality=torch.where(skipped_rows.to(device), -1, modality), expert=safe_expert)
    ref_y, ref_grads = _reference(safe, dy, gate=pair_on)
    _check_all(safe, y, grads, ref_y, ref_grads, torch.float32)
    assert torch.equal(y[:5], inputs["out"][:5]) and torch.equal(y[12], inputs["out"][12])
    assert torch.equal(grads["gate"][10, 0], torch.zeros((), device=device))

    if device.type == "cuda":  # the public op without validation takes the same path
        y_public = mose_lora(inputs["x"], modality, expert, inputs["gate"], inputs["A"], inputs["B"],
                             inputs["scale"], inputs["out"], backend="triton", validate=False)
        assert torch.equal(y_public, y.detach())


def test_forward_is_deterministic_and_matches_torch_backend(device):
    inputs = make_mose_inputs(100, 40, 30, rank=16, top_k=2, device=device)
    first, _ = _run(inputs, grads=())
    second, _ = _run(inputs, grads=())
    assert torch.equal(first, second)
    args = (inputs["x"], inputs["modality"], inputs["expert"], inputs["gate"], inputs["A"], inputs["B"],
            inputs["scale"], inputs["out"])
    torch_y = mose_lora(*args, backend="torch")
    assert rel_error(_update(first, inputs), _update(torch_y, inputs)) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sync detection, graph capture)")
def test_no_host_sync_and_cuda_graph_capture():
    device = torch.device("cuda")
    inputs = make_mose_inputs(512, 256, 192, rank=16, top_k=2, dtype=torch.bfloat16, device=device)
    leaves = {n: inputs[n].clone().requires_grad_(True) for n in GRAD_NAMES}
    args = (leaves["x"], inputs["modality"], inputs["expert"], leaves["gate"], leaves["A"], leaves["B"],
            inputs["scale"], leaves["out"])
    mose_lora(*args, backend="triton").sum().backward()  # compile first
    torch.cuda.synchronize()
    W = torch.randn(192, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    scale_vec = inputs["scale"].float()
    linear_args = (leaves["x"], W, None, inputs["modality"], inputs["expert"], leaves["gate"], leaves["A"],
                   leaves["B"], scale_vec)
    for deterministic in (False, True):  # compile first
        mose_linear_triton(*linear_args, return_update_norm=True, deterministic=deterministic)[0].sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = mose_lora(*args, backend="triton", validate=False)
        y.backward(torch.ones_like(y))
        for deterministic in (False, True):
            y, norm = mose_linear_triton(*linear_args, return_update_norm=True, deterministic=deterministic)
            y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")

    x, out = inputs["x"].clone(), inputs["out"].clone()
    static_args = (x, inputs["modality"], inputs["expert"], inputs["gate"], inputs["A"], inputs["B"],
                   inputs["scale"], out)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        mose_lora(*static_args, backend="triton", validate=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mose_lora(*static_args, backend="triton", validate=False)
    x.copy_(torch.randn_like(x))
    graph.replay()
    expected = mose_lora(*static_args, backend="triton")
    assert torch.equal(captured, expected)


# ------------------------------------------------------------------------------------------------
# Routing: one counting-sort kernel
# ------------------------------------------------------------------------------------------------


def _expected_routing(modality, expert, n_modalities, n_experts):
    """Stable argsort of the token keys and of the pair keys (triton_routing.py), and bucket bounds."""
    m, e = modality.cpu().long(), expert.cpu().long()
    top_k = e.shape[1]
    adapted = (m >= 0) & (m < n_modalities)
    e_valid = (e >= 0) & (e < n_experts)
    key = m.clamp(min=0)
    for j in range(top_k):
        key = key * n_experts + torch.where(e_valid[:, j], e[:, j], 0)
    n_keys = n_modalities * n_experts ** top_k
    key = torch.where(adapted & e_valid.any(1), key, n_keys)
    pair_key = torch.where(adapted[:, None] & e_valid, m[:, None] * n_experts + e, n_modalities * n_experts)

    def sort(keys, n_buckets):
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(keys, minlength=n_buckets + 1).cumsum(0)])
        return torch.sort(keys, stable=True).indices, bounds

    return sort(key, n_keys), sort(pair_key.reshape(-1), n_modalities * n_experts)


@pytest.mark.parametrize("n_tokens,top_k,sort_pairs", [(300, 1, False), (300, 2, True), (77, 2, False), (0, 2, True)])
def test_routing_is_one_stable_counting_sort(device, monkeypatch, n_tokens, top_k, sort_pairs):
    inputs = make_mose_inputs(n_tokens, 8, 8, n_modalities=3, n_experts=4, top_k=top_k, device=device,
                              pad_fraction=0.2)
    modality, expert = inputs["modality"].clone(), inputs["expert"].clone()
    if n_tokens:  # ids out of range (validation off): sorted as documented, never indexed
        modality[:3] = torch.tensor([5, -7, 3])
        expert[5, 0], expert[6, top_k - 1] = 9, -2
    launched = []
    kernel_class = type(launch.mose_route_kernel)  # JITFunction, or InterpretedFunction in the interpreter
    real_run = kernel_class.run

    def counting_run(kernel, *args, **kwargs):
        launched.append(kernel)
        return real_run(kernel, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", counting_run)
    routing = launch.route(modality, expert, 3, 4, sort_pairs=sort_pairs)
    assert len(launched) == 1  # token and pair sorts in one kernel
    (order, offsets), (pair_order, pair_offsets) = _expected_routing(modality, expert, 3, 4)
    assert torch.equal(routing.order.cpu().long(), order)
    assert torch.equal(routing.offsets.cpu().long(), offsets)
    if top_k == 1 or sort_pairs:
        assert torch.equal(routing.pair_order.cpu().long(), pair_order)
        assert torch.equal(routing.pair_offsets.cpu().long(), pair_offsets)
    else:
        assert routing.pair_order is None


def test_splits_fill_the_gpu_presets():
    """Every streaming kernel launches at least PROGRAMS_PER_SM programs per SM at the GPU presets,
    with every feature tile in exactly one split."""
    from mosear_fast.kernels.target import H100, pretend

    target = launch.PROGRAMS_PER_SM * H100.multiprocessor_count
    for n_tokens, d in ((2048, 4096), (8192, 3584), (16384, 18944)):
        blocks = -(-n_tokens // launch.token_block(n_tokens))
        tiles = -(-d // launch.feature_block(d))
        with pretend(H100):
            splits, per_split = launch.feature_splits(blocks, tiles, torch.device("cpu"))
        assert blocks * splits >= target or splits == tiles
        assert (splits - 1) * per_split < tiles <= splits * per_split


# ------------------------------------------------------------------------------------------------
# Faults stay where they happen (issue 17): a NaN in one group's weights reaches only its rows
# ------------------------------------------------------------------------------------------------


def _poison(inputs, where, top_k):
    """A copy of the weights with one NaN in modality 1's A, or in B of one expert that modality 1
    uses; returns the poisoned inputs and the rows that read it."""
    modality, expert = inputs["modality"], inputs["expert"]
    poisoned = dict(inputs, A=inputs["A"].clone(), B=inputs["B"].clone())
    if where == "A":
        poisoned["A"][1, 0, 0] = float("nan")
        return poisoned, modality == 1
    e = int(expert[modality == 1][0, top_k - 1])
    poisoned["B"][1, e, 0, 0] = float("nan")
    return poisoned, (modality == 1) & (expert == e).any(1)


def _forward_backward(op, inputs, dy):
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in ("x", "gate")}
    y = op(leaves, inputs)
    y.backward(dy)
    return y.detach(), leaves["x"].grad, leaves["gate"].grad


def _lora_op(leaves, inputs):
    return mose_lora_triton(leaves["x"], inputs["modality"], inputs["expert"], leaves["gate"], inputs["A"],
                            inputs["B"], _scale_vec(inputs, leaves["x"].device), inputs["out"])


def _linear_op(leaves, inputs):
    return mose_linear_triton(leaves["x"], inputs["W"], inputs["bias"], inputs["modality"], inputs["expert"],
                              leaves["gate"], inputs["A"], inputs["B"], _scale_vec(inputs, leaves["x"].device))


@pytest.mark.parametrize("op", ["lora", "linear"])
@pytest.mark.parametrize("where,top_k", [("B", 1), ("B", 2), ("A", 2)])
def test_nan_in_one_group_stays_in_its_rows(device, op, where, top_k):
    inputs = make_mose_inputs(40, 24, 20, n_modalities=3, n_experts=4, rank=8, top_k=top_k, device=device,
                              pad_fraction=0.2, seed=5)
    inputs["W"] = torch.randn(20, 24, device=device) * 0.2
    inputs["bias"] = torch.randn(20, device=device)
    run = _lora_op if op == "lora" else _linear_op
    dy = torch.randn(40, 20, device=device)
    clean = _forward_backward(run, inputs, dy)
    poisoned, hit = _poison(inputs, where, top_k)
    y, dx, dgate = _forward_backward(run, poisoned, dy)
    padding = inputs["modality"] < 0
    assert hit.any() and (~hit & ~padding).any() and padding.any()
    assert torch.isnan(y[hit]).any()  # the rows that read the NaN do see it
    for got, ref in zip((y, dx, dgate), clean):  # every other row: finite and exactly the clean result
        assert torch.isfinite(got[~hit]).all()
        assert torch.equal(got[~hit], ref[~hit])
    if op == "lora":
        assert torch.equal(y[padding], inputs["out"][padding])


# ------------------------------------------------------------------------------------------------
# Fused base + adapter: mose_linear_triton (cuBLAS base GEMM accumulating into the Triton expand)
# ------------------------------------------------------------------------------------------------


def _linear_inputs(dtype, top_k, rank, with_bias, device, n_tokens=90, d_in=72, d_out=50):
    inputs = make_mose_inputs(n_tokens, d_in, d_out, rank=rank, top_k=top_k, dtype=dtype, device=device,
                              with_out=False, seed=rank + top_k)
    inputs["W"] = (torch.randn(d_out, d_in, device=device) * d_in ** -0.5).to(dtype)
    inputs["bias"] = torch.randn(d_out, device=device).to(dtype) if with_bias else None
    return inputs


def _linear_reference(inputs, dy):
    """float64 y = F.linear + reference update, its gradients, and the update norms before scale."""
    names = [n for n in ("x", "gate", "A", "B", "W", "bias") if inputs[n] is not None]
    ref = {n: inputs[n].detach().cpu().double().requires_grad_(True) for n in names}
    modality, expert, scale = inputs["modality"].cpu(), inputs["expert"].cpu(), inputs["scale"].cpu()
    base = torch.nn.functional.linear(ref["x"], ref["W"], ref.get("bias"))
    y = mose_lora_reference(ref["x"], modality, expert, ref["gate"], ref["A"], ref["B"], scale, base)
    y.backward(dy.cpu().double())
    update = mose_lora_reference(ref["x"], modality, expert, ref["gate"], ref["A"], ref["B"],
                                 torch.ones_like(scale, dtype=torch.float64))
    return y.detach(), base.detach(), {n: t.grad for n, t in ref.items()}, update.detach().norm(dim=1)


@pytest.mark.parametrize("dtype,top_k,rank,with_bias,train_base", [
    (torch.float32, 2, 8, True, True),
    (torch.float32, 1, 24, False, False),
    (torch.bfloat16, 1, 16, False, True),
    (torch.bfloat16, 2, 4, True, False),
    (torch.float16, 2, 64, True, False),
])
def test_linear_forward_gradients_and_norms_match_reference(device, dtype, top_k, rank, with_bias, train_base):
    inputs = _linear_inputs(dtype, top_k, rank, with_bias, device)
    dy = torch.randn(90, 50, device=device).to(dtype)
    trained = ("x", "gate", "A", "B") + (("W", "bias") if train_base else ())
    leaves = {n: inputs[n].detach().clone().requires_grad_(n in trained) for n in ("x", "gate", "A", "B", "W", "bias")
              if inputs[n] is not None}
    y, norm = mose_linear_triton(leaves["x"], leaves["W"], leaves.get("bias"), inputs["modality"], inputs["expert"],
                                 leaves["gate"], leaves["A"], leaves["B"], _scale_vec(inputs, device),
                                 return_update_norm=True)
    y.backward(dy)
    ref_y, base, ref_grads, ref_norm = _linear_reference(inputs, dy)
    assert y.dtype == dtype and norm.dtype == torch.float32 and not norm.requires_grad
    assert_close(y, ref_y, dtype, what="y")
    assert_close(y.detach().cpu().double() - base, ref_y - base, dtype, what="update (y - base)")
    assert_close(norm, ref_norm, dtype, what="update norm")
    assert torch.equal(norm[inputs["modality"] < 0], torch.zeros_like(norm[inputs["modality"] < 0]))
    for name, leaf in leaves.items():
        if name in trained:
            assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
            assert_close(leaf.grad, ref_grads[name], dtype, what=f"d{name}")
        else:
            assert leaf.grad is None, name


def test_linear_without_grad_and_deterministic_backward(device):
    inputs = _linear_inputs(torch.bfloat16, 2, 16, True, device, n_tokens=130)
    args = (inputs["modality"], inputs["expert"])
    scale_vec = _scale_vec(inputs, device)
    plain = mose_linear_triton(inputs["x"], inputs["W"], inputs["bias"], *args, inputs["gate"], inputs["A"],
                               inputs["B"], scale_vec)
    dy = torch.randn(130, 50, device=device).to(torch.bfloat16)
    runs = []
    for _ in range(2):
        leaves = {n: inputs[n].clone().requires_grad_(True) for n in ("x", "gate", "A", "B", "W")}
        y = mose_linear_triton(leaves["x"], leaves["W"], inputs["bias"], *args, leaves["gate"], leaves["A"],
                               leaves["B"], scale_vec, deterministic=True)
        y.backward(dy)
        runs.append((y.detach(), {n: t.grad for n, t in leaves.items()}))
    assert torch.equal(runs[0][0], plain)  # the graph-free path computes the same forward
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name
    _, _, ref_grads, _ = _linear_reference(inputs, dy)
    for name, grad in runs[0][1].items():
        assert_close(grad, ref_grads[name], torch.bfloat16, what=f"d{name} (deterministic)")


# ------------------------------------------------------------------------------------------------
# Real compilation without a GPU: the interpreter accepts code the compiler rejects
# ------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = """
    from mosear_fast.kernels.mose import launch, triton_kernels as K, triton_routing as RT

    IDX = dict(order_ptr="*i32", modality_ptr="*i64", expert_ptr="*i64", gate_ptr="*fp32", scale_ptr="*fp32",
               offsets_ptr="*i32", pair_order_ptr="*i32", pair_offsets_ptr="*i32")
    F32 = "*fp32"
    for top_k, sub in ((1, 1), (2, 64)):
        compile_sm90(RT.mose_route_kernel, IDX, dict(TOP_K=top_k, SORT_PAIRS=top_k == 2, SUB=sub, BINS=64,
                     BLOCK_H=4096), launch.ROUTE_WARPS)
    for p, numerics, top_k, br, bk in (("*bf16", 0, 2, 16, 64), ("*fp32", 1, 1, 64, 32)):
        blocks = dict(BLOCK_T=64, BLOCK_R=br, NUMERICS=numerics, TOP_K=top_k)
        jobs = [
            (K.mose_shrink_kernel, dict(x_ptr=p, A_ptr=p, hp_ptr=F32), dict(BLOCK_K=bk)),
            (K.mose_expand_kernel, dict(hp_ptr=F32, B_ptr=p, base_ptr=p, y_ptr=p, h_ptr=F32, norm_ptr=F32),
             dict(HAS_BASE=True, ONLY_ADAPTED_ROWS=top_k == 1, WRITE_H=True, WRITE_NORM=top_k == 2, BLOCK_N=bk)),
            (K.mose_dy_kernel, dict(dy_ptr=p, h_ptr=F32, B_ptr=p, dhp_ptr=F32, qp_ptr=F32, dB_ptr=F32),
             dict(FUSE_DB=top_k == 2, BLOCK_N=bk)),
            (K.mose_x_kernel, dict(x_ptr=p, A_ptr=p, dhp_ptr=F32, qp_ptr=F32, dx_ptr=p, dA_ptr=F32, dh_ptr=F32,
                                   dgate_ptr=F32),
             dict(WRITE_DX=True, FUSE_DA=top_k == 2, WRITE_DH=top_k == 1, WRITE_DGATE=True, BLOCK_K=bk)),
            (K.mose_wgrad_A_kernel, dict(x_ptr=p, dh_ptr=F32, dAp_ptr=F32), dict(BLOCK_K=bk)),
            (K.mose_wgrad_B_kernel, dict(dy_ptr=p, h_ptr=F32, dBp_ptr=F32), dict(BLOCK_N=bk)),
        ]
        for fn, pointers, consts in jobs:
            compile_sm90(fn, dict(IDX, **pointers), dict(blocks, **consts), launch.NUM_WARPS)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every kernel goes through Triton's real pipeline (TTIR to cubin, sm_90) in a process without
    the interpreter: needs the triton package's bundled ptxas, not a GPU."""
    compile_kernels(_COMPILE_SCRIPT, expected=14)
