"""Modality-id helpers: spans and placeholder token ids."""

import pytest
import torch

from mosear_fast import modality_ids_from_spans, modality_ids_from_token_ids


def test_spans_with_names_ids_default_and_padding():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    ids = modality_ids_from_spans([[(1, 3, "visual"), (3, 4, 2)], [(3, 5, "audio")]], 6, attention_mask=mask)
    assert ids.tolist() == [[0, 1, 1, 2, 0, 0], [-1, -1, 0, 2, 2, 0]]
    custom = modality_ids_from_spans([[(0, 2, "face")]], 3, modalities=("text", "face"), default="text")
    assert custom.tolist() == [[1, 1, 0]]


def test_token_ids_map_placeholders():
    input_ids = torch.tensor([[5, 90, 90, 91, 7], [0, 5, 91, 90, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    ids = modality_ids_from_token_ids(input_ids, {"visual": [90], "audio": 91}, attention_mask=mask)
    assert ids.tolist() == [[0, 1, 1, 2, 0], [-1, 0, 2, 1, 0]]


@pytest.mark.parametrize("call, message", [
    (lambda: modality_ids_from_spans([[(0, 9, "visual")]], 6), r"spans\[0\]\[0\]: expected 0 <= start"),
    (lambda: modality_ids_from_spans([[(0, 2)]], 6), r"spans\[0\]\[0\]: expected a \(start, stop, mod"),
    (lambda: modality_ids_from_spans([[(0, 2, "smell")]], 6), "unknown modality 'smell'"),
    (lambda: modality_ids_from_spans([[(0, 2, 3)]], 6), r"expected a modality id in \[0, 3\)"),
    (lambda: modality_ids_from_spans([[]], 6, attention_mask=torch.ones(1, 5)), "attention_mask: expected "
                                                                                "shape"),
    (lambda: modality_ids_from_token_ids(torch.zeros(4, dtype=torch.long), {}), "input_ids: expected a"),
    (lambda: modality_ids_from_token_ids(torch.zeros(1, 4, dtype=torch.long), {"visual": [1], "audio": [1]}),
     "listed under two modalities"),
])
def test_helper_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_placeholder_token_ids_from_a_config():
    from types import SimpleNamespace

    from mosear_fast.modality import modality_ids_from_placeholders, placeholder_token_ids

    omni = SimpleNamespace(image_token_index=92, video_token_index=93, audio_token_index=91)
    assert placeholder_token_ids(omni, ("text", "visual", "audio")) == {1: (92, 93), 2: (91,)}
    assert placeholder_token_ids(omni, ("text", "image", "video", "audio")) == {1: (92,), 2: (93,), 3: (91,)}
    llava = SimpleNamespace(image_token_id=7, video_token_id=None)
    assert placeholder_token_ids(llava, ("text", "visual", "audio")) == {1: (7,)}
    assert placeholder_token_ids(SimpleNamespace(vocab_size=10), ("text", "visual", "audio")) == {}
    assert placeholder_token_ids(omni, ("text", "face")) == {}  # no modality named for a placeholder kind
    ids = modality_ids_from_placeholders(torch.tensor([[5, 92, 93, 91, 7]]), {1: (92, 93), 2: (91,)})
    assert ids.tolist() == [[0, 1, 1, 2, 0]]
