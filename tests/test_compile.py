"""torch.compile(fullgraph=True) of the public ops and of adapted tiny LLaMA / Qwen2 models (MoSE + AR):
the same results as eager, no graph break (fullgraph raises on one), no recompile on the next call, and
every MoSE / AR call one ``mosear::`` node in the graph. CPU, backend "aot_eager" (one slow inductor case)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import mosear_fast
from mosear_fast import ARConfig, MoSEConfig, apply_mosear, attention_shares, aux_loss
from tests.cases import make_ar_inputs, make_mose_inputs
from tests.models import TINY_MODELS, av_prompt


def recording_backend(seen: list, inner: str = "aot_eager"):
    """A torch.compile backend that notes the ``mosear::`` ops of each graph, then compiles with ``inner``."""
    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "mosear" in str(n.target))
        return torch._dynamo.lookup_backend(inner)(gm, example_inputs)
    return backend


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


# ------------------------------------------------------------------------------------------------
# The public ops
# ------------------------------------------------------------------------------------------------


def test_compiled_ops_match_eager_with_gradients():
    d = make_mose_inputs(24, 16, 12, n_modalities=3, n_experts=3, rank=4, top_k=2, with_out=False)
    w, b = torch.randn(12, 16), torch.randn(12)
    a = make_ar_inputs(1, 4, 2, 6, 6, 8, seed=1)

    def layer(x, A, B, q, k, v):
        y = mosear_fast.mose_linear(x, w, b, d["modality"], d["expert"], d["gate"], A, B, d["scale"])
        o = mosear_fast.ar_attention(q, k, v, a["key_modality"], num_modalities=3, target=(0.7, 0.3), strength=0.6)
        return y.sum() + (o * o).sum()

    results = []
    for compiled in (False, True):
        seen = []
        fn = torch.compile(layer, fullgraph=True, backend=recording_backend(seen)) if compiled else layer
        leaves = [t.clone().requires_grad_(True) for t in (d["x"], d["A"], d["B"], a["q"], a["k"], a["v"])]
        loss = fn(*leaves)
        results.append([loss, *torch.autograd.grad(loss, leaves)])
    assert sorted(seen) == ["mosear.ar_attention.default", "mosear.mose_linear.default"]
    for eager, compiled in zip(*results, strict=True):
        assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)


def test_compiled_ops_skip_value_reads_but_keep_shape_checks():
    d = make_mose_inputs(8, 16, 12, n_modalities=2, n_experts=3, rank=4)
    args = [d[n] for n in ("x", "modality", "expert", "gate", "A", "B", "scale")]
    fn = torch.compile(lambda *t: mosear_fast.mose_lora(*t), fullgraph=True, backend="aot_eager")
    assert torch.allclose(fn(*args), mosear_fast.mose_lora(*args), rtol=1e-5, atol=1e-6)  # no graph break
    bad = list(args)
    bad[0] = d["x"][:, :15]
    # the ValueError of eager mode (fullgraph reports it inside dynamo's error, with the same message)
    with pytest.raises(ValueError, match="A: expected"):
        torch.compile(lambda *t: mosear_fast.mose_lora(*t), backend="aot_eager")(*bad)
    with pytest.raises(Exception, match="A: expected"):
        fn(*bad)
    a = make_ar_inputs(1, 2, 2, 3, 3, 8)
    ar = torch.compile(lambda q, t: mosear_fast.ar_attention(q, a["k"], a["v"], a["key_modality"], num_modalities=3,
                                                             target=t), backend="aot_eager")
    with pytest.raises(ValueError, match="target: a tensor target cannot be read while a model is exported, compiled"):
        ar(a["q"], torch.tensor([0.5, 0.5]))
    balance = torch.compile(lambda q, b: mosear_fast.ar_attention(q, a["k"], a["v"], a["key_modality"],
                                                                  num_modalities=3, balance=b), backend="aot_eager")
    with pytest.raises(ValueError, match="balance: a tensor cannot be read while a model is exported, compiled"):
        balance(a["q"], torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------------------
# Adapted models
# ------------------------------------------------------------------------------------------------


def prepared(arch, *, strength=0.6, record_shares=False, **mose):
    model = TINY_MODELS[arch](layers=1)
    config = MoSEConfig(r=4, num_experts=3, top_k=2, init_weights=False, target_modules=["q_proj", "v_proj", "o_proj"],
                        **mose)
    torch.manual_seed(1)
    return apply_mosear(model, mose=config, ar=ARConfig(strength=strength, record_shares=record_shares))


def _adapter(model):
    return model.get_decoder().layers[0].self_attn.q_proj.mose_adapter["default"]


@pytest.mark.parametrize(("arch", "routing"), [("llama", "token"), ("qwen2", "sequence")])
def test_compiled_training_step_matches_eager(arch, routing):
    """Forward + backward of the adapters (dynamic weights, regularizers) through torch.compile(model)."""
    batches = [av_prompt(2, 12, seed=s) for s in (0, 5)]
    steps, seen = [], []
    for compiled in (False, True):
        model = prepared(arch, routing=routing).train()
        run = torch.compile(model, fullgraph=True, backend=recording_backend(seen)) if compiled else model
        results = []
        with torch._dynamo.config.patch(error_on_recompile=compiled):
            for ids, mask, modality in batches:  # the second step reuses the graph
                model.zero_grad()
                out = run(input_ids=ids, attention_mask=mask, modality_ids=modality, labels=ids, use_cache=False)
                loss = out.loss + aux_loss(model)
                loss.backward()
                a = _adapter(model)
                results.append((loss.detach(), a.A.grad.clone(), a.B.grad.clone(), a.router_weight.grad.clone(),
                                a.update_norm_ema.clone(), a.modality_weight.clone()))
        steps.append(results)
    assert all(p.grad is None for n, p in model.named_parameters() if ".mose_adapter." not in n)
    assert _graph_breaks() == 0
    # q, v, o projections (mose_linear) and the AR layer: one node each
    assert sorted(set(seen)) == ["mosear.ar_attention.default", "mosear.mose_linear.default"]
    assert seen.count("mosear.mose_linear.default") == 3 and seen.count("mosear.ar_attention.default") == 1
    for eager, compiled in zip(*steps, strict=True):
        for e, c in zip(eager, compiled, strict=True):
            assert torch.allclose(c, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_compiled_static_cache_generate_matches_eager(arch):
    """Greedy decoding with a static cache, the forward compiled by generate (fullgraph), same tokens and logits."""
    from transformers.generation.configuration_utils import CompileConfig

    model = prepared(arch, strength=0.8, record_shares=True).eval()
    ids, mask, modality = av_prompt(2, 13, left_pad=[2, 0])
    kw = dict(input_ids=ids, attention_mask=mask, modality_ids=modality, max_new_tokens=4, do_sample=False,
              output_logits=True, return_dict_in_generate=True, pad_token_id=0, cache_implementation="static")
    ref = model.generate(**kw, disable_compile=True)
    ref_shares = attention_shares(model)
    seen = []
    config = CompileConfig(fullgraph=True, backend=recording_backend(seen), mode=None)
    config._compile_all_devices = True  # generate compiles the decode steps on CUDA only otherwise
    out = model.generate(**kw, compile_config=config)
    assert hasattr(model, "_compiled_call")  # the decode steps ran compiled
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.allclose(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
    shares = attention_shares(model)
    assert shares.keys() == ref_shares.keys()
    assert all(torch.allclose(shares[k], ref_shares[k], atol=1e-6) for k in shares)
    assert _graph_breaks() == 0
    assert "mosear.ar_attention.default" in seen and "mosear.mose_linear.default" in seen
    with torch._dynamo.config.patch(error_on_recompile=True):  # a second generation reuses the graphs
        again = model.generate(**kw, compile_config=config)
    assert torch.equal(again.sequences, ref.sequences)


def test_compiled_training_refuses_gradient_checkpointing():
    model = prepared("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask, modality = av_prompt(1, 8)
    run = torch.compile(model, fullgraph=True, backend="aot_eager")
    # fullgraph reports the ValueError inside dynamo's error, with its message
    with pytest.raises(Exception, match="gradient_checkpointing: a MoSE model trained under torch.compile"):
        run(input_ids=ids, attention_mask=mask, modality_ids=modality, labels=ids, use_cache=False)


@pytest.mark.slow
def test_inductor_training_step_matches_eager():
    """The same training step through Inductor (C++ codegen on the CPU: ~1-2 min, hence slow)."""
    ids, mask, modality = av_prompt(2, 12)
    results = []
    for compiled in (False, True):
        model = prepared("llama").train()
        run = torch.compile(model, fullgraph=True, backend="inductor") if compiled else model
        out = run(input_ids=ids, attention_mask=mask, modality_ids=modality, labels=ids, use_cache=False)
        loss = out.loss + aux_loss(model)
        loss.backward()
        a = _adapter(model)
        results.append((loss.detach(), a.A.grad, a.B.grad, a.router_weight.grad, a.update_norm_ema.clone()))
    for e, c in zip(*results, strict=True):
        assert torch.allclose(c, e, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# torch.export
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_export_keeps_each_op_as_one_node(arch):
    from mosear_fast.library import custom_op_forms

    model = prepared(arch).eval()
    ids, mask, modality = av_prompt(1, 10)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, modality_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, modality_ids=modality_ids,
                              use_cache=False).logits

    with torch.no_grad(), custom_op_forms():
        exported = torch.export.export(Wrapped(), (ids, mask, modality), strict=False)
        expected = Wrapped()(ids, mask, modality)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("mosear.mose_linear.default") == 3  # q, v, o of the one layer
    assert targets.count("mosear.ar_attention.default") == 1
    assert torch.allclose(exported.module()(ids, mask, modality), expected, rtol=1e-5, atol=1e-6)
    # outside the context an export takes the static (ONNX) forms: no custom node
    with torch.no_grad():
        static = torch.export.export(Wrapped(), (ids, mask, modality), strict=False)
    assert not any("mosear" in str(n.target) for n in static.graph.nodes)
