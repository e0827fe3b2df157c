"""mosear-export's command line: one-line errors, exit status 2, no traceback, nothing written."""

import pytest

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
def test_cli_exports_the_demo(capsys, tmp_path):
    code = main(["demo", "--out", str(tmp_path / "out"), "--batch", "1:1:2", "--seq", "2:4:6"])
    out = capsys.readouterr().out
    assert code == 0
    assert "model.onnx" in out and "lint: no problems" in out and "onnxruntime" in out
