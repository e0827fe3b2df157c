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
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2  # the flag wins
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


# ---- issue 17: every bad input is one line (exit 2, no traceback), and nothing is left in the output folder


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fails_cleanly(tmp_path, capsys, argv, *needles):
    before = _tree(tmp_path)
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mosear-train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert _tree(tmp_path) == before  # no output folder, no staging folder
    return err


def _manifest(tmp_path, n=12):
    from mosear_fast.training import generate_camer

    return generate_camer(n_samples=n, n_visual_tokens=4, seed=0).write(tmp_path / "data")


def test_yaml_with_a_non_string_key_is_one_line(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\n1: 2\n")
    _fails_cleanly(tmp_path, capsys, ["--config", str(config)], f"--config {config}: field names must be text",
                   "int 1")


@pytest.mark.parametrize(("value", "message"), [
    ('["a","b"]', "weight_clip: expected a list of finite numbers"),
    ("[1]", "weight_clip: expected a list of 2 items"),
    ("[2, 1]", "weight_clip: expected (w_min, w_max) with 0 < w_min <= w_max"),
])
def test_weight_clip_of_wrong_items_is_one_line(tmp_path, capsys, value, message):
    _fails_cleanly(tmp_path, capsys, ["--output-dir", str(tmp_path / "out"), *SMALL, "--weight-clip", value],
                   message)


def test_target_modules_must_be_names(tmp_path, capsys):
    _fails_cleanly(tmp_path, capsys, ["--output-dir", str(tmp_path / "out"), *SMALL, "--target-modules", "[1, 2]"],
                   "target_modules: expected a list of non-empty strings")


def test_manifest_row_whose_tensor_file_is_not_safetensors(tmp_path, capsys):
    manifest = _manifest(tmp_path)
    sample = sorted((manifest.parent / "samples").iterdir())[5]
    sample.write_bytes(b"not a safetensors file, just bytes")
    line = next(i for i, text in enumerate(manifest.read_text().splitlines(), 1) if sample.name in text)
    _fails_cleanly(tmp_path, capsys, ["--output-dir", str(tmp_path / "out"), *SMALL, "--train-data", str(manifest),
                                      "--max-steps", "-1", "--epochs", "1"],  # every sample is read
                   f"{manifest}: line {line}: {sample}: not a safetensors file")


def test_backbone_weights_that_are_not_safetensors(tmp_path, capsys):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"\x00" * 64)
    _fails_cleanly(tmp_path, capsys, ["--output-dir", str(tmp_path / "out"), *SMALL, "--backbone-weights",
                                      str(weights)], f"backbone_weights: {weights}: not this backbone's weights")


def test_failure_during_training_names_the_file_and_leaves_nothing(tmp_path, capsys):
    # Issue 17 item 12: used to print "error: : No such file or directory: ..." and leave an empty folder.
    manifest = _manifest(tmp_path)
    sample = sorted((manifest.parent / "samples").iterdir())[3]
    sample.unlink()
    _fails_cleanly(tmp_path, capsys, ["--output-dir", str(tmp_path / "out"), *SMALL, "--train-data", str(manifest),
                                      "--max-steps", "-1", "--epochs", "1"],
                   f"{manifest}: line 4: {sample}: no such file")


def test_failure_keeps_a_previous_output_and_the_checkpoints_of_the_failed_run(tmp_path, capsys, monkeypatch):
    from mosear_fast.training.data import ManifestDataset

    out = tmp_path / "out"
    assert train_cli.main(["--output-dir", str(out), *SMALL]) == 0
    previous = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "adapter_model.safetensors" in previous and not (tmp_path / ".out.partial").exists()
    # A sample file disappears in the third batch (reads 9-12), after a checkpoint every step.
    manifest = _manifest(tmp_path)
    read = ManifestDataset.__getitem__
    reads, lost = [], []

    def vanishing(self, index):
        reads.append(index)
        if len(reads) == 9:
            lost.append(self.tensor_path(index))
            lost[0].rename(tmp_path / "elsewhere")
        return read(self, index)

    monkeypatch.setattr(ManifestDataset, "__getitem__", vanishing)
    argv = ["--output-dir", str(out), *SMALL, "--train-data", str(manifest), "--max-steps", "-1", "--epochs", "1",
            "--batch-size", "4", "--save-steps", "1", "--save-total-limit", "5"]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    staging = (tmp_path / ".out.partial").resolve()
    assert f"{lost[0]}: no such file" in err and f"checkpoints kept in {staging}" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == previous  # untouched
    # (the data loader reads one batch ahead, so the failure comes during step 2 or 3)
    assert {p.name for p in staging.glob("checkpoint-*")} in ({"checkpoint-1"}, {"checkpoint-1", "checkpoint-2"})
    # Once the file is back, --resume last continues from the failed run's newest checkpoint.
    monkeypatch.undo()
    (tmp_path / "elsewhere").rename(lost[0])
    assert train_cli.main([*argv, "--resume", "last"]) == 0
    assert not staging.exists()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    assert (out / "adapter_model.safetensors").read_bytes() != previous["adapter_model.safetensors"]
    load_trained(out)


def test_fsdp_in_one_process_is_refused(tmp_path, capsys):
    # (transformers' own check; a multi-process CPU run is refused by MoSETrainer: tests/test_training_ddp.py)
    _fails_cleanly(tmp_path, capsys, ["--output-dir", str(tmp_path / "out"), *SMALL, "--fsdp", "true"],
                   "fsdp only works in distributed training")


def test_a_staging_folder_removed_while_listed_holds_no_checkpoint(tmp_path, monkeypatch):
    """Rank 0 removes a failed run's staging folder while another rank looks for checkpoints in it to
    word its error line: the folder vanishing mid-listing means no checkpoint, not a traceback."""
    import os

    (tmp_path / "checkpoint-2").mkdir()
    assert train_cli.has_checkpoint(tmp_path)

    def vanished(path):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(os, "scandir", vanished)
    assert train_cli.has_checkpoint(tmp_path) is False
