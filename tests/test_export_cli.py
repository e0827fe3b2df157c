"""mosear-export's command line: one-line errors, exit status 2, no traceback, nothing written; the
export of a mosear-train output folder end to end."""

import json

import onnxruntime
import pytest
import torch

from mosear_fast.export.cli import main
from mosear_fast.export.tensorrt_build import missing_requirements


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def _assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mosear-export: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_source(capsys, tmp_path):
    code, err = _run(capsys, "no-such-model", "--out", str(tmp_path / "out"))
    _assert_one_line_error(code, err, "SOURCE", "no-such-model")
    assert not (tmp_path / "out").exists()


def test_folder_of_unknown_kind(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = _run(capsys, str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    _assert_one_line_error(code, err, "SOURCE", "backbone.json", "config.json")


def test_broken_trained_folder(capsys, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "backbone.json").write_text(json.dumps({"format": "mosear-av-lm/1"}))
    code, err = _run(capsys, str(folder), "--out", str(tmp_path / "out"))
    _assert_one_line_error(code, err, "SOURCE", "mosear-train output folder", "mose_config.json")
    assert not (tmp_path / "out").exists()


def test_trained_folder_refuses_adapter(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "backbone.json").write_text("{}")
    code, err = _run(capsys, str(tmp_path / "run"), "--adapter", str(tmp_path), "--out", str(tmp_path / "out"))
    _assert_one_line_error(code, err, "--adapter", "mosear-train output folder")


def test_demo_seq_shorter_than_its_placeholders(capsys, tmp_path):
    code, err = _run(capsys, "demo", "--out", str(tmp_path / "out"), "--seq", "1:16:64")
    _assert_one_line_error(code, err, "--seq", "seq >= 33", "32 visual + 1 audio placeholders")
    assert not (tmp_path / "out").exists()


def test_hf_folder_without_adapter(capsys, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    code, err = _run(capsys, str(tmp_path / "hf"), "--out", str(tmp_path / "out"))
    _assert_one_line_error(code, err, "--adapter")


@pytest.mark.parametrize("option, value, fragment", [
    ("--batch", "4:2:1", "min 4 > max 1"),
    ("--seq", "1:64:32", "--seq"),
    ("--seq", "x", "MIN:OPT:MAX"),
    ("--opset", "12", "--opset"),
    ("--rtol", "-1", "--rtol"),
    ("--trt-version", "7.0", "trt_version"),
])
def test_bad_options(capsys, tmp_path, option, value, fragment):
    code, err = _run(capsys, "demo", "--out", str(tmp_path / "out"), option, value)
    _assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_existing_output_without_overwrite(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    code, err = _run(capsys, "demo", "--out", str(tmp_path / "out"))
    _assert_one_line_error(code, err, "--overwrite")


def test_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = _run(capsys, "demo", "--out", str(blocker / "out"))
    _assert_one_line_error(code, err, "--out", "cannot write")


def test_tensorrt_without_tensorrt_names_what_is_missing(capsys, tmp_path):
    missing = missing_requirements()
    if not missing:
        pytest.skip("tensorrt and a GPU are present: the engine path is exercised instead")
    print(f"TensorRT build unavailable here: {'; '.join(missing)}")
    code, err = _run(capsys, "demo", "--out", str(tmp_path / "out"), "--format", "tensorrt")
    _assert_one_line_error(code, err, "--format tensorrt: needs")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_exports_a_trained_folder(capsys, tmp_path):
    """A mosear-train folder (training's writer) through the command line, with the default --seq; the
    graph then runs like load_trained's model on inputs built by the model's own prompt builder."""
    from mosear_fast.trained import load_trained
    from tests.test_export import write_trained_folder

    folder = write_trained_folder(tmp_path / "run")
    out = tmp_path / "out"
    code = main([str(folder), "--out", str(out), "--batch", "1:1:2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "model.onnx" in printed and "lint: no problems" in printed and "onnxruntime" in printed
    assert "(1, 7)" in printed  # the default --seq starts one text token above the 4 + 2 placeholders
    config = json.loads((out / "export_config.json").read_text())
    assert config["dynamic_axes"]["seq"] == {"min": 7, "opt": 13, "max": 128}

    model = load_trained(folder)
    g = torch.Generator().manual_seed(0)
    visual, audio = torch.randn(2, 4, 64, generator=g), torch.randn(2, 2, 64, generator=g)
    prompts = model.build_inputs([visual[0], visual[1]], [audio[0], audio[1]])  # the standard prompt, 13 tokens
    with torch.no_grad():
        expected = model(**prompts).logits
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {name: prompts[name].numpy() for name in ("input_ids", "visual", "audio", "attention_mask")}
    actual = torch.from_numpy(session.run(None, feeds)[0])
    assert actual.shape == expected.shape == (2, 13, config["outputs"][0]["shape"][2])
    assert float((actual - expected).norm() / expected.norm()) < 1e-5


def test_help_describes_the_sources_and_inputs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for fragment in ("the one mosear-demo trains", "mosear-train output folder", "demo-output/mose",
                     "FOLDER --adapter DIR", "visual (batch, Nv, Fv)", "derived in the graph", "export_config.json"):
        assert fragment in out, fragment
