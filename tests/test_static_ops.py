"""The static-shape forms of the ops (used while exporting) against the float64 references,
and the rule that switches to them while torch.export traces."""

import onnx
import pytest
import torch

from mosear_fast import ar_attention, mose_lora
from mosear_fast._validation import check_mose_args
from mosear_fast.backend import implementation, is_exporting
from mosear_fast.kernels.ar_attention.reference import ar_attention_reference
from mosear_fast.kernels.ar_attention.static import ar_attention_static
from mosear_fast.kernels.mose.reference import mose_lora_reference
from mosear_fast.kernels.mose.static import mose_lora_static
from mosear_fast.tolerances import assert_close
from tests.cases import make_ar_inputs, make_mose_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _scale_vec(d):
    return check_mose_args(d["x"], d["modality"], d["expert"], d["gate"], d["A"], d["B"], d["scale"], d["out"],
                           inplace=False, validate=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("with_out", [True, False])
def test_mose_static_matches_reference(dtype, top_k, with_out):
    d = make_mose_inputs(37, 24, 20, top_k=top_k, dtype=dtype, with_out=with_out, unused_experts=(3,))
    y = mose_lora_static(d["x"], d["modality"], d["expert"], d["gate"], d["A"], d["B"], _scale_vec(d), d["out"])
    ref = mose_lora_reference(**d)
    base = d["out"].double() if with_out else torch.zeros_like(ref)
    assert y.dtype == dtype
    assert_close(y.double() - base, ref - base, dtype, what="update")
    untouched = d["modality"] < 0
    assert torch.equal(y[untouched].double(), base[untouched].to(dtype).double())


def test_mose_static_float_scale_and_gradients():
    d = make_mose_inputs(19, 8, 12, top_k=2, tensor_scale=False, dtype=torch.float64)
    for name in ("x", "gate", "A", "B", "out"):
        d[name].requires_grad_(True)
    scale = torch.full((3,), d["scale"], dtype=torch.float32)
    y = mose_lora_static(d["x"], d["modality"], d["expert"], d["gate"], d["A"], d["B"], scale, d["out"])
    ref = mose_lora_reference(**d)
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((y * weights).sum(), [d[n] for n in ("x", "gate", "A", "B", "out")])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [d[n] for n in ("x", "gate", "A", "B", "out")])
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32)


AR_CASES = {
    "gqa_causal": dict(shape=(2, 4, 2, 9, 9, 16), kw={}),
    "decode_lq_lt_lk": dict(shape=(2, 4, 1, 3, 11, 8), kw={}),
    "lq_gt_lk": dict(shape=(1, 2, 2, 7, 4, 8), kw={}),
    "not_causal_bias_target": dict(shape=(2, 2, 1, 6, 10, 8),
                                   kw=dict(causal=False, modality_bias=(0.0, -1.0, 0.5), target=(1.0, 3.0))),
    "threshold_strength1": dict(shape=(1, 2, 2, 8, 8, 8), kw=dict(strength=1.0, threshold=0.1)),
    # DESIGN 2.2b; targets as validation hands them over (normalised tuples; per head: Hq rows)
    "window": dict(shape=(2, 4, 2, 9, 12, 8), kw=dict(window=4)),
    "window_lq_gt_lk": dict(shape=(1, 2, 1, 7, 4, 8), kw=dict(window=2)),
    "softcap": dict(shape=(2, 4, 2, 9, 9, 8), kw=dict(softcap=0.7, scale=1.0)),
    "contribution": dict(shape=(2, 4, 2, 9, 9, 8), kw=dict(balance_by="contribution", strength=0.8)),
    "contribution3": dict(shape=(1, 2, 1, 10, 10, 8), kw=dict(balance_by="contribution", balance=(0, 1, 2),
                                                              target=(0.2, 0.3, 0.5), threshold=0.02)),
    "per_head_all": dict(shape=(1, 4, 2, 8, 11, 8), kw=dict(
        window=5, softcap=2.0, balance_by="contribution", modality_bias=(0.1, -0.3, 0.2),
        target=((0.5, 0.5), (0.9, 0.1), (0.2, 0.8), (0.6, 0.4)))),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(AR_CASES))
def test_ar_static_matches_reference(case, dtype):
    batch, hq, hkv, lq, lk, dim = AR_CASES[case]["shape"]
    d = make_ar_inputs(batch, hq, hkv, lq, lk, dim, dtype=dtype)
    kw = dict(num_modalities=3, balance=(1, 2), target=None, strength=0.5, threshold=0.0, modality_bias=None,
              causal=True, scale=dim ** -0.5)
    kw.update(AR_CASES[case]["kw"])
    query_mask = torch.rand(batch, lq, generator=torch.Generator().manual_seed(1)) > 0.3
    o, masses = ar_attention_static(**d, **kw, query_mask=query_mask, return_masses=True)
    ref_o, ref_m = ar_attention_reference(**d, **kw, query_mask=query_mask)
    assert o.dtype == dtype and masses.dtype == torch.float32
    assert_close(o, ref_o, dtype, what="o")
    assert_close(masses, ref_m, dtype, what="masses")


def test_ar_static_underflowing_modality_keeps_its_mass():
    # audio scores of -1e4 relative to the rest: its softmax mass underflows, AR must still give it mass
    d = make_ar_inputs(1, 2, 2, 8, 8, 8, layout="av")
    bias = (0.0, 0.0, -1e4)
    kw = dict(num_modalities=3, balance=(1, 2), target=None, strength=0.5, threshold=0.0, modality_bias=bias,
              causal=True, scale=8 ** -0.5)
    o = ar_attention_static(**d, **kw, query_mask=None, return_masses=False)
    ref_o, _ = ar_attention_reference(**d, **kw)
    assert_close(o, ref_o, torch.float32)


def test_queries_without_visible_key_output_zeros():
    d = make_ar_inputs(1, 2, 1, 4, 4, 8)
    d["key_modality"][:] = -1
    o = ar_attention_static(**d, num_modalities=3, balance=(1, 2), target=None, strength=0.5, threshold=0.0,
                            modality_bias=None, causal=True, scale=0.3, query_mask=None, return_masses=False)
    assert torch.equal(o, torch.zeros_like(o))


def test_static_forms_are_picked_only_while_exporting():
    assert not is_exporting()
    assert implementation("mose_lora", "auto", torch.device("cpu")).__name__ == "mose_lora_torch"
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["exporting"] = is_exporting()
            seen["mose"] = implementation("mose_lora", "torch", x.device).__name__
            seen["ar"] = implementation("ar_attention", "auto", x.device).__name__
            return x + 1

    torch.export.export(Probe(), (torch.randn(2, 3),))
    assert seen == {"exporting": True, "mose": "mose_lora_static", "ar": "ar_attention_static"}


def test_ar_static_contribution_gradients_match_reference():
    d = make_ar_inputs(1, 4, 2, 6, 8, 8, seed=3)
    kw = dict(num_modalities=3, balance=(1, 2), target=((0.5, 0.5), (0.7, 0.3), (0.1, 0.9), (0.4, 0.6)),
              strength=0.7, threshold=0.0, modality_bias=None, causal=True, scale=8 ** -0.5, window=5, softcap=1.5,
              balance_by="contribution")
    leaves = [d[n].clone().requires_grad_(True) for n in "qkv"]
    ref_leaves = [d[n].double().requires_grad_(True) for n in "qkv"]
    o = ar_attention_static(*leaves, d["key_modality"], **kw, query_mask=None, return_masses=False)
    ref_o, _ = ar_attention_reference(*ref_leaves, d["key_modality"], **kw)
    weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((o * weights).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_o * weights.double()).sum(), ref_leaves)
    for g, r, n in zip(grads, ref_grads, "qkv"):
        assert_close(g, r, torch.float32, what=f"grad {n}")


class _Ops(torch.nn.Module):
    def __init__(self, **ar_options):
        super().__init__()
        self.ar_options = ar_options

    def forward(self, x, modality, expert, gate, A, B, q, k, v, key_modality):
        y = mose_lora(x, modality, expert, gate, A, B, 0.5)
        o = ar_attention(q, k, v, key_modality, num_modalities=3, **self.ar_options)
        return y, o


EXPORT_AR_OPTIONS = {
    "plain": {},
    # a sliding window, softcap, contribution balancing and per-head targets: all in standard ops
    "options": dict(window=3, softcap=5.0, balance_by="contribution", target=((1.0, 2.0), (3.0, 1.0))),
}


@pytest.mark.parametrize("options", sorted(EXPORT_AR_OPTIONS))
def test_static_forms_export_without_data_dependent_nodes(tmp_path, options):
    ort = pytest.importorskip("onnxruntime")
    d = make_mose_inputs(12, 8, 8, top_k=2)
    a = make_ar_inputs(1, 2, 1, 6, 6, 8, layout="av")
    args = (d["x"], d["modality"], d["expert"], d["gate"], d["A"], d["B"], a["q"], a["k"], a["v"], a["key_modality"])
    n, length = torch.export.Dim("n", min=2, max=64), torch.export.Dim("len", min=2, max=64)
    dynamic = ({0: n}, {0: n}, {0: n}, {0: n}, None, None, {2: length}, {2: length}, {2: length}, {1: length})
    path = tmp_path / "ops.onnx"
    module = _Ops(**EXPORT_AR_OPTIONS[options])
    torch.onnx.export(module, args, str(path), dynamo=True, dynamic_shapes=dynamic)
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & {"NonZero", "ScatterND", "ScatterElements", "Loop", "If"}, ops
    assert "MatMul" in ops
    # the graph runs at another length and matches the eager op (the window and caps are not baked in)
    b = make_ar_inputs(1, 2, 1, 11, 11, 8, layout="av", seed=4)
    args = args[:6] + (b["q"], b["k"], b["v"], b["key_modality"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), args)}
    _, o = session.run(None, feed)
    _, expected = module(*args)
    assert_close(torch.from_numpy(o), expected, torch.float32, what="onnxruntime AR output")
