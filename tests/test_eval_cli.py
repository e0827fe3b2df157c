"""mosear-eval end to end through main([...]): reports, problems, errors, help, progress."""

import json

import pytest

from mosear_fast.training import generate_camer
from mosear_fast.training.eval_cli import main

from .test_camer import LABEL_ROWS, PREDICTION_ROWS

OUTPUTS = {"report.json", "report.md", "camer.png"}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path, labels, predictions, *extra):
    out = tmp_path / "out"
    rc = main(["--labels", str(_write_jsonl(tmp_path / "labels.jsonl", labels)),
               "--predictions", str(_write_jsonl(tmp_path / "predictions.jsonl", predictions)),
               "--out", str(out), *extra])  # fmt: skip
    return rc, out


def test_end_to_end_known_values(tmp_path, capsys):
    rc, out = _run(tmp_path, LABEL_ROWS, PREDICTION_ROWS)
    assert rc == 0
    assert {p.name for p in out.iterdir()} == OUTPUTS  # nothing else: no temporary files left
    report = json.loads((out / "report.json").read_text())
    assert set(report["subsets"]) == {"video_aligned", "audio_aligned", "consistent"}
    assert all(set(m) == {"n", "accuracy", "recall", "mean"} for m in report["subsets"].values())
    # Hand-computed in test_camer.test_evaluate_rows_known_values.
    assert report["subsets"]["video_aligned"] == {"n": 2, "accuracy": 0.25, "recall": 0.5, "mean": 0.375}
    assert report["subsets"]["audio_aligned"]["accuracy"] == pytest.approx(2 / 3)
    assert report["subsets"]["consistent"] == {"n": 1, "accuracy": 1.0, "recall": 1.0, "mean": 1.0}
    assert report["conflict_gap"] == pytest.approx(5 / 12)
    assert report["excluded"] == 1 and report["problems"] == []
    md = (out / "report.md").read_text()
    assert "| video-aligned | 2 | 25.00 | 50.00 | 37.50 |" in md and "+41.67 points" in md
    assert (out / "camer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "video_aligned" in printed and "conflict gap: +41.67" in printed


def test_problems_are_reported_and_printed(tmp_path, capsys):
    labels = [
        *LABEL_ROWS,
        LABEL_ROWS[0],
        {"id": "u1", "label": "glee", "audio_label": "sad", "video_label": "sad"},
    ]
    predictions = [*PREDICTION_ROWS[1:], {"id": "nope", "prediction": "sad"}, {"id": "a1", "prediction": "x"},
                   {"id": "c1x", "prediction": 42}]  # fmt: skip
    rc, out = _run(tmp_path, labels, predictions)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["problem_counts"] == {"duplicate_id": 2, "unparsable_label": 1, "unknown_id": 2,
                                        "missing_prediction": 1}  # fmt: skip
    missing = [p for p in report["problems"] if p["kind"] == "missing_prediction"]
    assert missing[0]["id"] == "v1" and missing[0]["line"] == 1
    printed = capsys.readouterr().out
    for kind in report["problem_counts"]:
        assert f"problem {kind}" in printed
    assert "id='nope'" in printed
    assert "missing_prediction" in (out / "report.md").read_text()
    # --strict turns problems into exit status 1 (the reports are still written).
    rc, _ = _run(tmp_path, labels, predictions, "--strict", "--quiet")
    assert rc == 1 and capsys.readouterr().out == ""


def test_empty_subsets_give_null_metrics(tmp_path):
    labels = [{"id": "c", "label": "sad", "audio_label": "sad", "video_label": "sad"}]
    rc, out = _run(
        tmp_path, labels, [{"id": "c", "prediction": "sad", "attention": {"audio": 0.7, "visual": 0.3}}]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["subsets"]["video_aligned"] == {"n": 0, "accuracy": None, "recall": None, "mean": None}
    assert report["conflict_gap"] is None
    assert report["attention_share"]["consistent"] == {"audio": 0.7, "visual": 0.3}
    assert "n/a" in (out / "report.md").read_text() and (out / "camer.png").stat().st_size > 0


def test_audio_biased_predictions_on_a_synthetic_manifest(tmp_path):
    # A "model" that always answers the audio label: right on audio-aligned and consistent,
    # wrong on video-aligned; the conflict gap is the whole range. The manifest is the label file.
    data = generate_camer(n_samples=30, n_visual_tokens=2, visual_dim=4, audio_dim=4, seed=9)
    manifest = data.write(tmp_path / "data")
    predictions = [
        {"id": r["id"], "prediction": f"The voice sounds {r['audio_label']}."} for r in data.label_rows()
    ]
    out = tmp_path / "out"
    preds = _write_jsonl(tmp_path / "p.jsonl", predictions)
    assert main(["--labels", str(manifest), "--predictions", str(preds), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [report["subsets"][s]["accuracy"] for s in ("video_aligned", "audio_aligned", "consistent")] == [
        0,
        1,
        1,
    ]
    assert report["conflict_gap"] == 1.0 and sum(m["n"] for m in report["subsets"].values()) == 30


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ('{"id": "a"}\n{"id": \n', "line 2: not valid JSON"),
        (b"\xff\xfe\x00bad", "not UTF-8"),
    ],
)
def test_unreadable_input_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    labels = tmp_path / "labels.jsonl"
    if isinstance(content, bytes):
        labels.write_bytes(content)
    elif content is not None:
        labels.write_text(content)
    preds = _write_jsonl(tmp_path / "p.jsonl", PREDICTION_ROWS)
    rc = main(["--labels", str(labels), "--predictions", str(preds), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.startswith("mosear-eval: error:") and err.count("\n") == 1
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("occupied")
    rc, _ = _run(tmp_path, LABEL_ROWS, PREDICTION_ROWS)
    assert rc == 2 and "--out" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--labels", "--predictions", "--out", "--title", "--strict", "--no-progress", "--quiet"):
        assert option in text
    assert "conflict gap" in text and "audio_label" in text


def test_missing_required_option_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--labels", "x.jsonl"])
    assert info.value.code == 2 and "--predictions" in capsys.readouterr().err


def test_progress_bar_for_many_rows(tmp_path, capsys):
    labels = [{"id": i, "label": "sad", "audio_label": "sad", "video_label": "sad"} for i in range(2500)]
    predictions = [{"id": i, "prediction": "sad"} for i in range(2500)]
    rc, _ = _run(tmp_path, labels, predictions)
    assert rc == 0 and "scoring" in capsys.readouterr().err
    rc, _ = _run(tmp_path, labels, predictions, "--no-progress")
    assert rc == 0 and "scoring" not in capsys.readouterr().err


def test_empty_files_give_an_all_null_report(tmp_path):
    rc, out = _run(tmp_path, [], [])
    report = json.loads((out / "report.json").read_text())
    assert rc == 0 and report["conflict_gap"] is None and {p.name for p in out.iterdir()} == OUTPUTS
    assert all(
        m == {"n": 0, "accuracy": None, "recall": None, "mean": None} for m in report["subsets"].values()
    )
