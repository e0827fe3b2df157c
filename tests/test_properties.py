"""Property-based shape tests (hypothesis): any valid shape matches the reference."""

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mosear_fast import ar_attention, mose_linear, mose_lora
from mosear_fast.kernels.ar_attention import ar_attention_reference
from mosear_fast.kernels.mose import mose_lora_reference
from mosear_fast.tolerances import assert_close

from .cases import make_ar_inputs, make_mose_inputs

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(n=st.integers(0, 40), d_in=st.integers(1, 24), d_out=st.integers(1, 24), rank=st.integers(1, 8),
       n_mod=st.integers(1, 8), n_exp=st.integers(1, 16), top_k=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
# With every dimension 1 the update is ~0.1% of a random `out`, and float32 rounding of y - out alone
# exceeded 1e-5 when the update was judged through out: the update is judged with out=None.
@example(n=26, d_in=1, d_out=1, rank=1, n_mod=1, n_exp=1, top_k=1, seed=0)
def test_mose_any_shape(n, d_in, d_out, rank, n_mod, n_exp, top_k, seed):
    args = make_mose_inputs(n, d_in, d_out, n_modalities=n_mod, n_experts=n_exp, rank=rank, top_k=top_k,
                            seed=seed, with_out=False)
    names = ("x", "modality", "expert", "gate", "A", "B", "scale")
    update = mose_lora(*(args[k] for k in names), backend="torch")
    assert_close(update, mose_lora_reference(*(args[k] for k in names)), torch.float32, what="update")


@SETTINGS
@given(n=st.integers(0, 40), d_in=st.integers(1, 24), d_out=st.integers(1, 24), rank=st.integers(1, 8),
       n_mod=st.integers(1, 8), n_exp=st.integers(1, 16), top_k=st.sampled_from([1, 2]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_mose_linear_any_shape(n, d_in, d_out, rank, n_mod, n_exp, top_k, bias, seed):
    """mose_linear's update (y minus the base layer, judged against the reference update alone) and
    the update norms, for any shape."""
    args = make_mose_inputs(n, d_in, d_out, n_modalities=n_mod, n_experts=n_exp, rank=rank, top_k=top_k,
                            seed=seed, with_out=False)
    weight, b = torch.zeros(d_out, d_in), (torch.zeros(d_out) if bias else None)  # y is the update exactly
    routing = tuple(args[k] for k in ("modality", "expert", "gate", "A", "B", "scale"))
    y, norm = mose_linear(args["x"], weight, b, *routing, return_update_norm=True, backend="torch")
    ref = mose_lora_reference(args["x"], *routing)
    assert_close(y, ref, torch.float32, what="update")
    raw = mose_lora_reference(args["x"], *routing[:5], 1.0)
    assert_close(norm, raw.norm(dim=-1), torch.float32, what="update norm")


@SETTINGS
@given(batch=st.integers(1, 2), n_kv=st.integers(1, 3), group=st.integers(1, 3), len_q=st.integers(1, 12),
       len_k=st.integers(1, 12), head_dim=st.integers(1, 12), n_mod=st.integers(1, 5),
       causal=st.booleans(), strength=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_ar_any_shape(batch, n_kv, group, len_q, len_k, head_dim, n_mod, causal, strength, seed):
    args = make_ar_inputs(batch, n_kv * group, n_kv, len_q, len_k, head_dim, n_modalities=n_mod, seed=seed)
    balance = tuple(range(min(n_mod, 2), n_mod))[:3] or (0,)
    kw = dict(num_modalities=n_mod, balance=balance, strength=strength, causal=causal)
    o, masses = ar_attention(*(args[k] for k in ("q", "k", "v", "key_modality")), return_masses=True,
                             backend="torch", **kw)
    ref_o, ref_m = ar_attention_reference(*(args[k] for k in ("q", "k", "v", "key_modality")), **kw)
    assert_close(o, ref_o, torch.float32)
    assert_close(masses, ref_m, torch.float32, what="masses")
