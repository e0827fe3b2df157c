"""Token rows for Hugging Face models (training/token_rows.py) and the answers mosear-predict computes from
them (training/scoring.py): both row forms, every bad row a one-line error naming file, line and field,
padding and modality ids of the batches, feature files, and batched label scores / greedy generation
against one-sequence-at-a-time references."""

import json

import pytest
import torch

from mosear_fast import ARConfig, MoSEConfig, apply_mosear
from mosear_fast.training.example_model import build_model, build_tokenizer, prompt, vocabulary
from mosear_fast.training.scoring import generate_answers, score_labels
from mosear_fast.training.token_rows import IGNORE_INDEX, TokenRows, TokenRowsCollator, encode_answer, encode_prompt


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(tmp_path, rows, tokenizer, **kwargs):
    options = dict(tokenizer=tokenizer, vocab_size=len(vocabulary()), num_modalities=3)
    options.update(kwargs)
    return TokenRows(write_rows(tmp_path / "rows.jsonl", rows), **options)


def test_prompt_answer_rows_put_the_loss_on_the_answer_and_eos(tmp_path, tokenizer):
    text = prompt("happy", "sad")
    data = rows_of(tmp_path, [{"id": 7, "prompt": text, "answer": "sad"}], tokenizer)
    example = data[0]
    prompt_ids = tokenizer(text)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id  # no chat template: plain tokenisation, special tokens in
    answer = [tokenizer.convert_tokens_to_ids("sad"), tokenizer.eos_token_id]
    assert example.input_ids == (*prompt_ids, *answer)
    assert example.labels == (*[IGNORE_INDEX] * len(prompt_ids), *answer)
    assert example.prompt_length == len(prompt_ids) and example.modality_ids is None


def test_chat_template_is_used_when_the_tokenizer_has_one(tmp_path):
    template = ("{% for m in messages %}<s> the {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}emotion ? {% endif %}")
    chat = build_tokenizer(chat_template=template)
    ids = encode_prompt(chat, "face is smiling")
    assert chat.convert_ids_to_tokens(ids) == ["<s>", "the", "face", "is", "smiling", "emotion", "?"]  # one BOS
    assert encode_answer(chat, "happy") == [chat.convert_tokens_to_ids("happy"), chat.eos_token_id]


def test_input_ids_rows_keep_their_labels_and_modality_ids(tmp_path, tokenizer):
    rows = [{"id": "a", "input_ids": [1, 4, 9, 10, 11], "labels": [-100, -100, -100, 10, 11],
             "modality_ids": [0, 1, 0, 0, 0]},
            {"id": "b", "input_ids": [1, 5, 9], "labels": [-100, -100, 9]}]
    data = rows_of(tmp_path, rows, tokenizer)
    assert data[0].labels == (-100, -100, -100, 10, 11) and data[0].prompt_length == 3
    assert data[0].modality_ids == (0, 1, 0, 0, 0) and data[1].modality_ids is None
    # for prediction, labels are optional: the whole row is then the prompt
    unlabelled = rows_of(tmp_path, [{"id": "c", "input_ids": [1, 5, 9]}], tokenizer, training=False)
    assert unlabelled[0].prompt_length == 3 and unlabelled[0].labels is None


@pytest.mark.parametrize(("row", "message"), [
    ([1, 2], "expected a JSON object, got list"),
    ({"id": True, "prompt": "x", "answer": "y"}, "id: expected a non-empty string or an integer"),
    ({"id": 1, "prompt": "face", "answer": "happy", "input_ids": [1]}, "got both"),
    ({"id": 1, "text": "face"}, "expected input_ids (with labels) or prompt (with answer), got the keys"),
    ({"id": 1, "input_ids": [1, 2], "labels": [-100]}, "labels: expected 2 values like input_ids, got 1"),
    ({"id": 1, "input_ids": [1, 99], "labels": [-100, 2]}, "input_ids[1]: expected an id in [0, 32), got 99"),
    ({"id": 1, "input_ids": [1, 2], "labels": [-100, -7]}, "labels[1]: expected an id in [0, 32) or -100"),
    ({"id": 1, "input_ids": [1, 2], "labels": [-100, 2], "modality_ids": [0, 3]},
     "modality_ids[1]: expected an id in [-1, 3), got 3"),
    ({"id": 1, "input_ids": [1, 2], "labels": [-100, -100]}, "labels: a training row needs labels"),
    ({"id": 1, "input_ids": [1, 2]}, "labels: a training row needs labels"),
    ({"id": 1, "input_ids": [1, 2.5], "labels": [-100, 2]}, "input_ids[1]: expected an integer, got 2.5"),
    ({"id": 1, "prompt": "face"}, "answer: a training row of the prompt form needs an answer"),
    ({"id": 1, "prompt": " ", "answer": "happy"}, "prompt: expected non-empty text"),
    ({"id": 1, "prompt": "face", "answer": "happy", "features": "missing.safetensors"}, "features: "),
])
def test_bad_rows_name_the_file_line_and_field(tmp_path, tokenizer, row, message):
    good = {"id": "ok", "prompt": "face", "answer": "happy"}
    with pytest.raises(ValueError) as info:
        rows_of(tmp_path, [good, row], tokenizer)
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'rows.jsonl'}: line 2: ") and message in text and "\n" not in text, text


def test_duplicates_long_rows_and_missing_tokenizer_are_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"line 2: duplicate id 'a' \(first on line 1\)"):
        rows_of(tmp_path, [{"id": "a", "prompt": "face", "answer": "sad"}] * 2, tokenizer)
    with pytest.raises(ValueError, match="line 1: 3 tokens, more than the model's 2 positions"):
        rows_of(tmp_path, [{"id": "a", "input_ids": [1, 2, 3], "labels": [-100, 2, 3]}], tokenizer, max_length=2)
    with pytest.raises(ValueError, match="line 1: prompt: rows of the prompt/answer form need the model folder's"):
        rows_of(tmp_path, [{"id": "a", "prompt": "face", "answer": "sad"}], None)
    with pytest.raises(ValueError, match="line 1: labels: the first token is already a label"):
        rows_of(tmp_path, [{"id": "a", "input_ids": [1, 2], "labels": [1, 2]}], tokenizer, training=False)


def test_batches_pad_right_for_training_and_left_for_prompts(tmp_path, tokenizer):
    video, audio = tokenizer.convert_tokens_to_ids("<video>"), tokenizer.convert_tokens_to_ids("<audio>")
    rows = [{"id": "a", "input_ids": [1, video, 9, audio, 10, 11], "labels": [-100, -100, -100, -100, 10, 11]},
            {"id": "b", "input_ids": [1, 9, 12], "labels": [-100, -100, 12], "modality_ids": [2, 2, 0]}]
    data = rows_of(tmp_path, rows, tokenizer)
    collate = TokenRowsCollator(pad_id=0, placeholders={1: (video,), 2: (audio,)})
    batch = collate([data[0], data[1]])
    assert batch["input_ids"].tolist() == [[1, video, 9, audio, 10, 11], [1, 9, 12, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 10, 11], [-100, -100, 12, -100, -100, -100]]
    assert batch["modality_ids"].tolist() == [[0, 1, 0, 2, 0, 0], [2, 2, 0, -1, -1, -1]]  # placeholders / own
    prompts = TokenRowsCollator(pad_id=0, placeholders={1: (video,), 2: (audio,)}, training=False)(list(data))
    assert prompts["input_ids"].tolist() == [[1, video, 9, audio], [0, 0, 1, 9]]
    assert prompts["modality_ids"].tolist() == [[0, 1, 0, 2], [-1, -1, 2, 2]] and "labels" not in prompts


def test_feature_files_concatenate_along_dim0_and_bad_ones_are_named(tmp_path, tokenizer):
    from safetensors.torch import save_file

    save_file({"pixel_values": torch.randn(3, 4), "image_grid_thw": torch.tensor([[1, 1, 3]])},
              str(tmp_path / "a.safetensors"))
    save_file({"pixel_values": torch.randn(5, 4), "image_grid_thw": torch.tensor([[1, 1, 5]])},
              str(tmp_path / "b.safetensors"))
    save_file({"pixel_values": torch.randn(2, 6), "image_grid_thw": torch.tensor([[1, 1, 2]])},
              str(tmp_path / "c.safetensors"))
    save_file({"pixels": torch.randn(2, 4)}, str(tmp_path / "d.safetensors"))
    (tmp_path / "e.safetensors").write_bytes(b"not safetensors")
    rows = [{"id": name, "prompt": "face", "answer": "happy", "features": f"{name}.safetensors"} for name in "abcde"]
    data = rows_of(tmp_path, [*rows, {"id": "f", "prompt": "face", "answer": "happy"}], tokenizer)
    collate = TokenRowsCollator(pad_id=0, forward_arguments=("pixel_values", "image_grid_thw"))
    batch = collate([data[0], data[1]])
    assert batch["pixel_values"].shape == (8, 4) and batch["image_grid_thw"].tolist() == [[1, 1, 3], [1, 1, 5]]
    where = f"{tmp_path / 'rows.jsonl'}"
    for pair, message in ((data[0], data[2]), "pixel_values has shapes [(2, 6), (3, 4)] in one batch"), \
                         ((data[3],), f"{where}: line 4: features: {tmp_path / 'd.safetensors'} holds ['pixels']"), \
                         ((data[4],), f"{where}: line 5: features: {tmp_path / 'e.safetensors'}: not a readable"), \
                         ((data[0], data[5]), f"{where}: line 6: row 'f' has no features"):
        with pytest.raises(ValueError) as info:
            collate(list(pair))
        assert message in str(info.value) and "\n" not in str(info.value)


# ---- label scores and generation against one sequence at a time ----------------------------------------------


@pytest.fixture(scope="module")
def model(tokenizer):
    model = build_model(tokenizer, seed=3, hidden=32)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        apply_mosear(model, mose=MoSEConfig(r=4, num_experts=2, init_weights=False),
                     ar=ARConfig(strength=0.6))
    return model.eval()


def prediction_rows(tmp_path, tokenizer):
    video, audio = tokenizer.convert_tokens_to_ids("<video>"), tokenizer.convert_tokens_to_ids("<audio>")
    rows = [{"id": "p", "prompt": prompt("sad", "happy")},
            {"id": "q", "prompt": "<video> the face is smiling . what emotion ?"},
            {"id": "r", "input_ids": [1, audio, 9, video, 9, 10, 11], "labels": [-100] * 5 + [10, 11],
             "modality_ids": [0, 2, 2, 1, 1, 0, 0]}]
    data = rows_of(tmp_path, rows, tokenizer, training=False)
    collate = TokenRowsCollator(pad_id=0, placeholders={1: (video,), 2: (audio,)}, training=False)
    return data, collate


def one_sequence_log_probs(model, collate, example, answer):
    ids = torch.tensor([[*example.input_ids[:example.prompt_length], *answer]])
    modality = collate.modality_ids(example, example.prompt_length)
    modality = torch.cat([modality, torch.zeros(len(answer), dtype=torch.long)])[None]
    with torch.no_grad():
        log_probs = model(input_ids=ids, modality_ids=modality).logits[0].log_softmax(-1)
    n = example.prompt_length
    return torch.stack([log_probs[n - 1 + j, token] for j, token in enumerate(answer)])


def test_label_scores_are_the_summed_or_mean_log_probs_of_each_answer(tmp_path, tokenizer, model):
    data, collate = prediction_rows(tmp_path, tokenizer)
    answers = [encode_answer(tokenizer, text) for text in ("happy", "sad", "the face")]  # 2, 2 and 3 tokens
    expected = torch.tensor([[one_sequence_log_probs(model, collate, e, a).sum().item() for a in answers]
                             for e in data])
    got = score_labels(model, collate, list(data), answers, reduce="sum")
    assert got.shape == (3, 3) and torch.allclose(got, expected, atol=2e-5), (got, expected)
    lengths = torch.tensor([len(a) for a in answers], dtype=torch.float32)
    mean = score_labels(model, collate, list(data), answers, reduce="mean")
    assert torch.allclose(mean, expected / lengths, atol=2e-5)
    assert not torch.allclose(got[0], got[1])  # different prompts, different scores


def test_generation_is_greedy_per_prompt(tmp_path, tokenizer, model):
    data, collate = prediction_rows(tmp_path, tokenizer)
    texts = generate_answers(model, tokenizer, collate, list(data), max_new_tokens=3)
    for example, text in zip(data, texts, strict=True):
        ids = torch.tensor([example.input_ids[:example.prompt_length]])
        modality = collate.modality_ids(example, example.prompt_length)[None]
        tokens = model.generate(input_ids=ids, modality_ids=modality, max_new_tokens=3, do_sample=False,
                                pad_token_id=0, eos_token_id=tokenizer.eos_token_id)
        assert text == tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True).strip()
