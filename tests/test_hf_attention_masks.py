"""The AR attention function's view of masks: the check that a layer's mask is what AR applies (against
transformers' own mask builders), and the visible modalities behind the attention shares."""

import pytest
import torch

from mosear_fast import hf_attention
from mosear_fast.hf_attention import _mask_mismatch, _visible_modalities


def transformers_mask(kind, padding, *, len_q, window=None):
    """transformers' own 4-D mask for ``len_q`` queries at the end of ``padding.shape[1]`` keys."""
    from transformers.masking_utils import (
        causal_mask_function,
        eager_mask,
        sdpa_mask,
        sliding_window_causal_mask_function,
    )

    len_k = padding.shape[1]
    function = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    build = sdpa_mask if kind == "sdpa" else eager_mask
    return build(batch_size=padding.shape[0], q_length=len_q, kv_length=len_k, q_offset=len_k - len_q,
                 mask_function=function, attention_mask=padding.bool(), allow_is_causal_skip=False,
                 dtype=torch.float32)


@pytest.mark.parametrize("kind", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [None, 1, 3, 20])
@pytest.mark.parametrize("len_q", [1, 4, 9])
def test_transformers_masks_match_what_ar_applies(kind, window, len_q):
    padding = torch.ones(3, 9, dtype=torch.long)
    padding[1, :3] = 0  # left padding
    padding[2, 6:] = 0  # right padding
    mask = transformers_mask(kind, padding, len_q=len_q, window=window)
    key_ids = torch.randint(0, 3, (3, 9)).masked_fill(padding == 0, -1)
    real_query = key_ids[:, 9 - len_q:] >= 0
    assert _mask_mismatch(mask, key_ids, real_query, window=window, causal=True) == 0
    if window is not None and window < 9:  # a window one wider shows (sample 0 has every key)
        assert _mask_mismatch(mask, key_ids, real_query, window=window + 1, causal=True) > 0
    unpadded = key_ids.clamp_min(0)  # pads not marked: AR would attend keys the mask hides
    assert _mask_mismatch(mask, unpadded, unpadded[:, 9 - len_q:] >= 0, window=window, causal=True) > 0


def test_no_mask_means_causal_attention_over_every_key():
    key_ids = torch.randint(0, 3, (2, 7))
    real = torch.ones(2, 7, dtype=torch.bool)
    assert _mask_mismatch(None, key_ids, real, window=None, causal=True) == 0
    assert _mask_mismatch(None, key_ids, real, window=3, causal=True) > 0  # the model applies no window here
    hidden = key_ids.clone()
    hidden[0, 2] = -1
    assert _mask_mismatch(None, hidden, real, window=None, causal=True) > 0
    with pytest.raises(ValueError, match=r"attention_mask: expected a \(B, 1 or H, 7, 7\) mask"):
        _mask_mismatch(torch.ones(2, 1, 6, 7, dtype=torch.bool), key_ids, real, window=None, causal=True)


def test_an_additive_bias_in_the_mask_is_not_reproducible():
    key_ids = torch.zeros(1, 4, dtype=torch.long)
    mask = torch.zeros(1, 1, 4, 4).masked_fill(~torch.tril(torch.ones(4, 4, dtype=torch.bool)), float("-inf"))
    real = torch.ones(1, 4, dtype=torch.bool)
    assert _mask_mismatch(mask, key_ids, real, window=None, causal=True) == 0
    mask[0, 0, 3, 1] = -0.5  # an ALiBi-like bias
    assert _mask_mismatch(mask, key_ids, real, window=None, causal=True) == 1


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 2, 5])
@pytest.mark.parametrize("len_q", [1, 6, 8, 10])
def test_visible_modalities_equal_a_loop(causal, window, len_q):
    if window is not None and not causal:
        return  # AR refuses a window without causal masking
    g = torch.Generator().manual_seed(len_q + (window or 0))
    key_ids = torch.randint(-1, 4, (2, 8), generator=g)
    got = _visible_modalities(key_ids, len_q, 4, window=window, causal=causal)
    expected = torch.zeros(2, len_q, 4, dtype=torch.bool)
    for b in range(2):
        for i in range(len_q):
            pos = 8 - len_q + i
            for j in range(8):
                seen = (not causal or j <= pos) and (window is None or pos - j < window)
                if seen and key_ids[b, j] >= 0:
                    expected[b, i, key_ids[b, j]] = True
    assert torch.equal(got, expected)


def test_the_mask_is_checked_once_per_forward(monkeypatch):
    from mosear_fast import ARConfig, apply_mosear
    from tests.models import av_prompt, tiny_qwen2

    calls = []
    real = hf_attention._mask_mismatch
    monkeypatch.setattr(hf_attention, "_mask_mismatch", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = apply_mosear(tiny_qwen2(layers=3), ar=ARConfig(strength=0.5))
    ids, mask, modality = av_prompt(2, 12, left_pad=[0, 3])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, modality_ids=modality)
        assert len(calls) == 1  # three layers share one mask
        model(input_ids=ids, attention_mask=mask, modality_ids=modality)
    assert len(calls) == 2
