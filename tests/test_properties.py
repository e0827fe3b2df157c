"""Property-based shape tests (hypothesis): any valid shape matches the reference."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosear_fast import ar_attention, mose_lora
from mosear_fast.kernels.ar_attention import ar_attention_reference
from mosear_fast.kernels.mose import mose_lora_reference
from mosear_fast.tolerances import assert_close

from .cases import make_ar_inputs, make_mose_inputs

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(n=st.integers(0, 40), d_in=st.integers(1, 24), d_out=st.integers(1, 24), rank=st.integers(1, 8),
       n_mod=st.integers(1, 8), n_exp=st.integers(1, 16), top_k=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_mose_any_shape(n, d_in, d_out, rank, n_mod, n_exp, top_k, seed):
    args = make_mose_inputs(n, d_in, d_out, n_modalities=n_mod, n_experts=n_exp, rank=rank, top_k=top_k,
                            seed=seed)
    names = ("x", "modality", "expert", "gate", "A", "B", "scale", "out")
    y = mose_lora(*(args[k] for k in names), backend="torch")
    ref = mose_lora_reference(*(args[k] for k in names))
    assert_close(y.double() - args["out"].double(), ref - args["out"].double(), torch.float32, what="update")


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
