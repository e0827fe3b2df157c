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
