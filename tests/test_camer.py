"""CA-MER protocol: subset assignment, label-set metrics, label parsing, row problems."""

import pytest

from mosear_fast.training import (
    EMOTIONS,
    CamerAccumulator,
    assign_subset,
    evaluate_rows,
    label_index,
    normalize_label,
    parse_labels,
    score_label_sets,
)

# ---------------------------------------------------------------- subsets


@pytest.mark.parametrize(
    ("audio", "video", "truth", "expected"),
    [
        ("sad", "happy", "happy", "video_aligned"),
        ("happy", "sad", "happy", "audio_aligned"),
        ("fear", "fear", "fear", "consistent"),
        ("happy", "sad", "angry", None),  # all different: excluded
        ("sad", "sad", "happy", None),  # audio and video agree against the truth: no subset either
        (["happy", "sad"], ["sad", "happy"], {"sad", "happy"}, "consistent"),  # sets compare as sets
        (["happy"], ["happy", "sad"], ["happy", "sad"], "video_aligned"),
    ],
)
def test_assign_subset(audio, video, truth, expected):
    assert assign_subset(audio, video, truth) == expected


def test_assign_subset_rejects_empty_labels():
    with pytest.raises(TypeError, match="video_label"):
        assign_subset("happy", [], "happy")


# ---------------------------------------------------------------- per-sample metrics


def test_score_label_sets():
    assert score_label_sets({"happy", "sad"}, {"happy"}) == (0.5, 1.0)
    assert score_label_sets({"happy"}, {"happy", "sad"}) == (1.0, 0.5)
    assert score_label_sets({"angry"}, {"happy"}) == (0.0, 0.0)
    assert score_label_sets(set(), {"happy"}) == (0.0, 0.0)  # no answer scores 0
    with pytest.raises(ValueError, match="truth"):
        score_label_sets({"happy"}, set())


def test_accumulator_means_gap_and_empty_subset():
    acc = CamerAccumulator()
    acc.add("video_aligned", {"happy", "sad"}, {"happy"})  # 0.5, 1
    acc.add("video_aligned", {"neutral"}, {"angry"})  # 0, 0
    acc.add("audio_aligned", {"sad"}, {"sad"})  # 1, 1
    acc.add(None, {"happy"}, {"happy"})  # excluded: not scored
    out = acc.result()
    assert out["subsets"]["video_aligned"] == {"n": 2, "accuracy": 0.25, "recall": 0.5, "mean": 0.375}
    assert out["subsets"]["audio_aligned"] == {"n": 1, "accuracy": 1.0, "recall": 1.0, "mean": 1.0}
    assert out["subsets"]["consistent"] == {"n": 0, "accuracy": None, "recall": None, "mean": None}
    assert out["conflict_gap"] == pytest.approx(0.75)
    assert out["excluded"] == 1
    assert "attention_share" not in out


def test_accumulator_gap_is_null_when_an_aligned_subset_is_empty():
    acc = CamerAccumulator()
    acc.add("consistent", {"sad"}, {"sad"})
    assert acc.result()["conflict_gap"] is None
    with pytest.raises(ValueError, match="subset"):
        acc.add("video-aligned", {"sad"}, {"sad"})


def test_accumulator_attention_shares():
    acc = CamerAccumulator()
    acc.add("video_aligned", {"sad"}, {"happy"}, {"visual": 0.2, "audio": 0.6, "text": 0.2})
    acc.add("video_aligned", {"happy"}, {"happy"}, {"visual": 0.4, "audio": 0.4, "text": 0.2})
    acc.add("consistent", {"happy"}, {"happy"})
    shares = acc.result()["attention_share"]
    assert shares["video_aligned"] == pytest.approx({"audio": 0.5, "text": 0.2, "visual": 0.3})
    assert shares["consistent"] is None and shares["audio_aligned"] is None


# ---------------------------------------------------------------- labels and synonyms


@pytest.mark.parametrize(
    ("word", "label"),
    [
        ("angry", "angry"), ("anger", "angry"), ("mad", "angry"),
        ("worried", "worried"), ("worry", "worried"), ("anxious", "worried"), ("anxiety", "worried"),
        ("happy", "happy"), ("Happiness", "happy"), ("joy", "happy"),
        ("sad", "sad"), ("sadness", "sad"),
        ("surprise", "surprise"), ("surprised", "surprise"),
        ("fear", "fear"), ("afraid", "fear"), ("scared", "fear"),
        ("contempt", "contempt"), ("contemptuous", "contempt"),
        ("doubt", "doubt"), ("doubtful", "doubt"),
        ("neutral", "neutral"), (" calm ", "neutral"),
    ],
)  # fmt: skip
def test_synonyms(word, label):
    assert normalize_label(word) == label
    assert parse_labels(f"The speaker seems {word}.") == (label,)


def test_vocabulary_and_indices():
    assert EMOTIONS == (
        "happy",
        "sad",
        "neutral",
        "angry",
        "worried",
        "surprise",
        "fear",
        "contempt",
        "doubt",
    )
    assert label_index("anger") == 3


def test_parse_free_text_and_lists():
    text = "Mostly ANGRY (anger, really), maybe a little sad; not doubtful?"
    # Word matching, first-seen order, duplicates merged; negation is not understood.
    assert parse_labels(text) == ("angry", "sad", "doubt")
    assert parse_labels(["Happiness", "surprised", "joy"]) == ("happy", "surprise")
    assert parse_labels("madness") == ()  # whole words only
    assert parse_labels("I cannot tell") == ()
    assert parse_labels([]) == ()
    with pytest.raises(TypeError, match="prediction"):
        parse_labels(3)
    with pytest.raises(TypeError, match="prediction"):
        parse_labels(["happy", None])


def test_normalize_label_errors():
    with pytest.raises(ValueError, match="'glee'"):
        normalize_label("glee")
    with pytest.raises(TypeError, match="label"):
        normalize_label(None)


# ---------------------------------------------------------------- rows: metrics and problems

LABEL_ROWS = [
    {"id": "v1", "label": "happy", "audio_label": "sad", "video_label": "happy"},  # video-aligned
    {"id": "v2", "label": "angry", "audio_label": "neutral", "video_label": "anger"},  # video-aligned
    {"id": "a1", "label": "sad", "audio_label": "sad", "video_label": "happy"},  # audio-aligned
    {"id": "a2", "label": "fear", "audio_label": "scared", "video_label": "doubt"},  # audio-aligned
    {"id": "c1", "label": "neutral", "audio_label": "neutral", "video_label": "calm"},  # consistent
    {"id": "x1", "label": "happy", "audio_label": "sad", "video_label": "angry"},  # excluded
]
PREDICTION_ROWS = [
    {"id": "v1", "prediction": "I think the person is happy but also a bit sad"},  # {happy, sad}: 1/2, 1
    {"id": "v2", "prediction": "neutral"},  # 0, 0
    {"id": "a1", "prediction": ["sadness"]},  # 1, 1
    {"id": "a2", "prediction": "scared, or maybe doubtful and anxious"},  # {fear, doubt, worried}: 1/3, 1
    {"id": "c1", "prediction": "calm"},  # 1, 1
    {"id": "x1", "prediction": "happy"},  # excluded
]


def test_evaluate_rows_known_values():
    report = evaluate_rows(LABEL_ROWS, PREDICTION_ROWS)
    s = report["subsets"]
    # video-aligned: accuracy (1/2 + 0) / 2, recall (1 + 0) / 2
    assert s["video_aligned"] == {"n": 2, "accuracy": 0.25, "recall": 0.5, "mean": 0.375}
    # audio-aligned: accuracy (1 + 1/3) / 2 = 2/3, recall (1 + 1) / 2 = 1, mean 5/6
    assert s["audio_aligned"]["n"] == 2
    assert s["audio_aligned"]["accuracy"] == pytest.approx(2 / 3)
    assert s["audio_aligned"]["recall"] == 1.0
    assert s["audio_aligned"]["mean"] == pytest.approx(5 / 6)
    assert s["consistent"] == {"n": 1, "accuracy": 1.0, "recall": 1.0, "mean": 1.0}
    assert report["conflict_gap"] == pytest.approx(2 / 3 - 0.25)
    assert report["excluded"] == 1
    assert report["problems"] == [] and report["problem_counts"] == {}
    assert report["n_labels"] == 6 and report["n_predictions"] == 6


def test_evaluate_rows_reports_every_bad_row():
    labels = [
        *LABEL_ROWS[:2],
        {"id": "v1", "label": "sad", "audio_label": "sad", "video_label": "sad"},  # duplicate: first kept
        {"id": "u1", "label": "glee", "audio_label": "sad", "video_label": "happy"},  # unparsable label
        ["not", "an", "object"],  # malformed
        {"id": "m1", "label": "sad", "audio_label": "sad", "video_label": "happy"},  # no prediction
    ]
    predictions = [
        {"id": "v1", "prediction": "happy", "attention": {"visual": "lots"}},  # bad attention, still scored
        {"id": "v1", "prediction": "sad"},  # duplicate: first kept
        {"id": "v2", "prediction": "hmm, hard to say"},  # unparsable prediction: scored 0
        {"id": "zz", "prediction": "happy"},  # unknown id
        {"prediction": "happy"},  # malformed (no id)
    ]
    report = evaluate_rows(labels, predictions)
    assert report["problem_counts"] == {
        "malformed_row": 2, "duplicate_id": 2, "unparsable_label": 1, "unknown_id": 1,
        "missing_prediction": 1, "unparsable_prediction": 1, "bad_attention": 1,
    }  # fmt: skip
    by_kind = {(p["kind"], p["source"]): p for p in report["problems"]}
    assert (
        by_kind[("duplicate_id", "labels")]["line"] == 3 and by_kind[("duplicate_id", "labels")]["id"] == "v1"
    )
    assert by_kind[("duplicate_id", "predictions")]["line"] == 2
    assert by_kind[("unparsable_label", "labels")]["id"] == "u1"
    assert by_kind[("unknown_id", "predictions")]["id"] == "zz"
    assert by_kind[("missing_prediction", "labels")]["id"] == "m1"
    assert by_kind[("malformed_row", "labels")]["line"] == 5
    # v1 scores 1 (first prediction row), v2 scores 0; m1 (audio-aligned) has no prediction: 0.
    assert report["subsets"]["video_aligned"] == {"n": 2, "accuracy": 0.5, "recall": 0.5, "mean": 0.5}
    assert report["subsets"]["audio_aligned"] == {"n": 1, "accuracy": 0.0, "recall": 0.0, "mean": 0.0}
    assert report["conflict_gap"] == -0.5
    assert "attention_share" not in report


def test_evaluate_rows_takes_line_numbers_and_empty_input():
    report = evaluate_rows([(7, {"id": 1})], [])
    assert report["problems"][0]["line"] == 7 and report["problems"][0]["kind"] == "unparsable_label"
    empty = evaluate_rows([], [])
    assert all(
        empty["subsets"][s]["n"] == 0 and empty["subsets"][s]["accuracy"] is None for s in empty["subsets"]
    )
    assert empty["conflict_gap"] is None and empty["excluded"] == 0


@pytest.mark.parametrize("prediction", [42, None, {"label": "happy"}, ["happy", 3], "", "¯\\_(ツ)_/¯"])
def test_prediction_of_wrong_type_or_without_labels_is_unparsable(prediction):
    report = evaluate_rows(LABEL_ROWS[:1], [{"id": "v1", "prediction": prediction}])
    assert report["problem_counts"] == {"unparsable_prediction": 1}
    assert report["subsets"]["video_aligned"]["accuracy"] == 0.0
