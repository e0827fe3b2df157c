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


def _one_line_exit_2(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("mosear-eval: error:") and err.count("\n") == 1 and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"id": 1' + "0" * 5000 + ', "prediction": "sad"}', "line 2: unreadable JSON value (Exceeds the limit"),
        ('{"id": "v1", "prediction": ' + "[" * 100_000 + "]" * 100_000 + "}", "line 2: JSON nested too deeply"),
    ],
    ids=["int_of_5000_digits", "nested_100000_deep"],
)
def test_json_python_cannot_hold_is_one_line_naming_file_and_line(tmp_path, capsys, bad_line, message):
    # Issue 17 item 4: valid JSON that Python refuses (int-string conversion limit, RecursionError).
    labels = _write_jsonl(tmp_path / "labels.jsonl", LABEL_ROWS)
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(json.dumps(PREDICTION_ROWS[0]) + "\n" + bad_line + "\n")
    rc = main(["--labels", str(labels), "--predictions", str(predictions), "--out", str(tmp_path / "out")])
    _one_line_exit_2(capsys, rc, f"{predictions}: {message}")
    assert not (tmp_path / "out").exists()


def test_title_and_modality_names_are_text_not_mathtext(tmp_path):
    # Issue 17 item 5: '$' starts matplotlib mathtext; '\foo' inside it is a parse error.
    predictions = [{**row, "attention": {"$\\bar{$": 0.5, "audio": 0.5}} for row in PREDICTION_ROWS]
    rc, out = _run(tmp_path, LABEL_ROWS, predictions, "--title", "run $\\foo{$", "--quiet")
    assert rc == 0 and {p.name for p in out.iterdir()} == OUTPUTS
    assert (out / "report.md").read_text().startswith("# run $\\foo{$\n")


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_attention_share_outside_0_1_is_refused_naming_file_line_and_field(tmp_path, capsys):
    # Issue 17 item 11: 1e308 used to average to Infinity (report.json then not valid JSON).
    predictions = [dict(row) for row in PREDICTION_ROWS]
    predictions[1]["attention"] = {"visual": 1e308, "audio": 0.5}
    predictions[2]["attention"] = {"visual": 0.25, "audio": 0.75}
    rc, out = _run(tmp_path, LABEL_ROWS, predictions)
    assert rc == 0
    report = _strict_json(out / "report.json")
    assert report["problem_counts"] == {"bad_attention": 1}
    problem = report["problems"][0]
    assert (problem["source"], problem["line"]) == ("predictions", 2)
    assert "attention.visual: expected a share in [0, 1], got 1e+308" in problem["detail"]
    shares = [s for s in report["attention_share"].values() if s]
    assert shares == [{"audio": 0.75, "visual": 0.25}]  # only the valid row's shares
    printed = [line for line in capsys.readouterr().out.splitlines() if "attention.visual" in line]
    assert len(printed) == 1 and printed[0].lstrip().startswith(f"{tmp_path / 'predictions.jsonl'}:2 ")
    for share in (-0.1, 1.5, 40):
        predictions[1]["attention"] = {"visual": share}
        rc, out = _run(tmp_path, LABEL_ROWS, predictions, "--quiet")
        assert _strict_json(out / "report.json")["problem_counts"] == {"bad_attention": 1}, share


@pytest.mark.parametrize("previous_report", [False, True], ids=["new_out", "previous_report_kept"])
def test_report_folder_is_one_unit_when_writing_fails(tmp_path, capsys, monkeypatch, previous_report):
    # Issue 17 item 11: a failure while writing report.json used to leave camer.png and report.md behind.
    from mosear_fast.training import eval_cli

    out = tmp_path / "results" / "out"
    if previous_report:
        out.mkdir(parents=True)
        for name in OUTPUTS:
            (out / name).write_text(f"previous {name}")
        (out / "notes.txt").write_text("the user's own file")

    def disk_full(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(eval_cli, "atomic_write_text", disk_full)  # after the chart and report.md
    labels = _write_jsonl(tmp_path / "labels.jsonl", LABEL_ROWS)
    preds = _write_jsonl(tmp_path / "predictions.jsonl", PREDICTION_ROWS)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc = main(["--labels", str(labels), "--predictions", str(preds), "--out", str(out)])
    _one_line_exit_2(capsys, rc, f"--out {out}: No space left on device")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing of the failed run
    if previous_report:
        assert (out / "report.json").read_text() == "previous report.json"
    monkeypatch.undo()
    assert main(["--labels", str(labels), "--predictions", str(preds), "--out", str(out), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == OUTPUTS | ({"notes.txt"} if previous_report else set())
    assert _strict_json(out / "report.json")["subsets"]["consistent"]["n"] == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no staging folder left
