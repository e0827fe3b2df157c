"""mosear-demo (the README's first command) in its quick mode: runs, writes its outputs, is
deterministic by seed."""

import json

from mosear_fast.training import demo
from mosear_fast.training.demo import VARIANTS


def test_quick_demo_writes_table_chart_and_adapter(tmp_path, capsys):
    assert demo.main(["--quick", "--no-progress", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    for name in (*VARIANTS, "video-al.", "audio-al.", "consist.", "gap", "visual att.", "audio att."):
        assert name in out
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert list(results["variants"]) == list(VARIANTS)
    for report in results["variants"].values():
        assert report["conflict_gap"] is not None
        assert set(report["attention_share"]["consistent"]) == {"text", "visual", "audio"}
    assert (tmp_path / "a" / "demo.png").stat().st_size > 0
    assert (tmp_path / "a" / "mose" / "adapter_model.safetensors").is_file()
    # same seed, same numbers
    assert demo.main(["--quick", "--no-progress", "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["variants"] == results["variants"]


def test_demo_bad_argument_is_one_line_error(capsys):
    assert demo.main(["--quick", "--ar-strength", "3"]) == 2
    err = capsys.readouterr().err
    assert "ar-strength" in err and "Traceback" not in err
