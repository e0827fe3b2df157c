"""The benchmark baselines compute the same function as the references."""

import pytest
import torch

from mosear_fast.kernels.ar_attention import ar_attention_reference
from mosear_fast.kernels.mose import mose_lora_reference
from mosear_fast.tolerances import assert_close

from .baselines import ar_eager_materialised, mose_dense_masked, mose_naive_group_loop
from .cases import make_ar_inputs, make_mose_inputs


@pytest.mark.parametrize("baseline", [mose_naive_group_loop, mose_dense_masked])
@pytest.mark.parametrize("top_k", [1, 2])
def test_mose_baselines(baseline, top_k):
    args = make_mose_inputs(45, 12, 9, top_k=top_k, unused_experts=(1,))
    names = ("x", "modality", "expert", "gate", "A", "B", "scale", "out")
    y = baseline(*(args[n] for n in names))
    ref = mose_lora_reference(*(args[n] for n in names))
    assert_close(y.double() - args["out"].double(), ref - args["out"].double(), torch.float32, what="update")


@pytest.mark.parametrize("shape", [(2, 4, 2, 9, 9, 8), (1, 4, 1, 1, 13, 8)])
def test_ar_eager_baseline(shape):
    args = make_ar_inputs(*shape, layout="random", seed=2)
    tensors = [args[n] for n in ("q", "k", "v", "key_modality")]
    o = ar_eager_materialised(*tensors, num_modalities=3, strength=0.6)
    ref, _ = ar_attention_reference(*tensors, num_modalities=3, strength=0.6)
    assert_close(o, ref, torch.float32)


@pytest.mark.parametrize("shape", [(2, 4, 2, 12, 12, 8), (1, 4, 1, 1, 20, 8), (1, 2, 2, 5, 17, 8)])
def test_lse_merge_is_exact_ar(shape):
    """The FlexAttention composition (one attention per class with its LSE, then merge) computes
    DESIGN 2.2 exactly (here eagerly on the CPU)."""
    from bench.providers.ar_flex import lse_merge_attention

    args = make_ar_inputs(*shape, n_modalities=4, layout="random", seed=4)
    tensors = [args[n] for n in ("q", "k", "v", "key_modality")]
    kw = dict(num_modalities=4, balance=(1, 2), target=(1.0, 2.0), strength=0.7)
    o = lse_merge_attention(*tensors, **kw)
    ref, _ = ar_attention_reference(*tensors, **kw)
    has_key = ref.abs().amax(-1, keepdim=True) > 0  # flex leaves queries without keys at 0 too
    assert torch.equal(o * ~has_key, torch.zeros_like(o))
    assert_close(o, ref, torch.float32)


def test_flex_static_is_sdpa_with_the_bias():
    from bench.providers.ar_flex import STATIC_BIAS, flex_static_attention

    args = make_ar_inputs(2, 4, 2, 10, 10, 8, layout="av", left_pad=2)
    tensors = [args[n] for n in ("q", "k", "v", "key_modality")]
    ref, _ = ar_attention_reference(*tensors, num_modalities=3, strength=0.0, modality_bias=STATIC_BIAS)
    o = flex_static_attention(*tensors)
    real = args["key_modality"].cpu()[:, None, :, None].expand_as(o) >= 0  # queries at padding see nothing
    assert_close(o[real], ref[real], torch.float32)
