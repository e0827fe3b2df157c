"""mosear-train: YAML and flags, --help lists every field, bad settings give a one-line error."""

import json

import pytest

from mosear_fast.training import train_cli
from mosear_fast.training.train_config import FIELDS
from mosear_fast.training.trained_folder import load_trained

SMALL = ["--synthetic-samples", "30", "--backbone-sizes", '{"n_visual": 4, "hidden": 32, "intermediate": 64}',
         "--max-steps", "2", "--batch-size", "6", "--rank", "2", "--num-experts", "2", "--progress", "false"]


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for field in FIELDS:
        assert f"--{field.name.replace('_', '-')}" in out


def test_yaml_config_with_flag_override(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nsynthetic_samples: 30\nrank: 3\nmax_steps: 2\n"
                      "backbone_sizes: {n_visual: 4, hidden: 32, intermediate: 64}\nbatch_size: 6\n"
                      "num_experts: 2\nprogress: false\n")
    assert train_cli.main(["--config", str(config), "--rank", "2", "--ar-strength", "0.3"]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "mose_config.json").read_text())["r"] == 2  # the flag wins
    assert json.loads((out / "ar_config.json").read_text())["strength"] == 0.3
    model = load_trained(out)
    assert model.sizes.n_visual == 4


def test_flags_only_with_backbone_weights(tmp_path):
    from mosear_fast.av_model import build_demo_model
    from mosear_fast.training.trained_folder import write_backbone_weights

    backbone, _ = build_demo_model(7, n_visual=4, hidden=32, intermediate=64)
    write_backbone_weights(tmp_path / "bb", backbone)
    out = tmp_path / "out"
    assert train_cli.main(["--output-dir", str(out), *SMALL, "--backbone-weights",
                           str(tmp_path / "bb" / "backbone.safetensors"), "--ar", "false"]) == 0
    assert json.loads((out / "backbone.json").read_text())["weights"] == "backbone.safetensors"
    assert json.loads((out / "ar_config.json").read_text()) is None
    model = load_trained(out)
    name = "llm.model.embed_tokens.weight"
    assert (model.state_dict()[name] == backbone.state_dict()[name]).all()


@pytest.mark.parametrize("args, message", [
    (["--rank", "zero"], "rank: expected an integer"),
    (["--routing", "tokens"], "routing: expected one of"),
    (["--top-k", "2", "--num-experts", "1"], "top_k: expected <= num_experts"),
    (["--train-data", "missing.jsonl"], "train_data:"),
    (["--backbone-sizes", '{"hiden": 3}'], "backbone_sizes:"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, args, message):
    assert train_cli.main(["--output-dir", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_yaml_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("output_dir: x\nnot_a_field: 1\n")
    assert train_cli.main(["--config", str(config)]) == 2
    assert "unknown fields ['not_a_field']" in capsys.readouterr().err
    config.write_text("output_dir: [unclosed\n")
    assert train_cli.main(["--config", str(config)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
