"""MoSETrainer on the built-in audio-visual LM: dynamic weights, loss, resume, output folder."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mosear_fast import ARConfig, MoSEConfig
from mosear_fast.av_model import build_demo_model
from mosear_fast.training.adapter_state import ADAPTER_FILE, mose_adapters
from mosear_fast.training.fit import default_training_arguments, fit_mose, prepare_mose
from mosear_fast.training.synthetic import generate_camer
from mosear_fast.training.trained_folder import backbone_reference, load_trained

SIZES = {"n_visual": 6, "hidden": 32, "intermediate": 64}


def setup(mose=None, seed=0):
    model, _ = build_demo_model(seed, **SIZES)
    mose = mose or MoSEConfig(r=4, num_experts=3)
    return prepare_mose(model, mose, seed=seed), mose


def data(n=64):
    return generate_camer(n_samples=n, n_visual_tokens=SIZES["n_visual"], seed=0)


def fit(out, *, mose=None, resume=None, callbacks=None, **overrides):
    model, mose = setup(mose)
    settings = dict(max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1, seed=0)
    settings.update(overrides)
    args = default_training_arguments(out, **settings)
    trainer = fit_mose(model, data(), args, mose=mose, ar=ARConfig(strength=0.5),  # AR that moves mass
                       backbone=backbone_reference(0, SIZES, None), resume_from_checkpoint=resume, callbacks=callbacks)
    return model, trainer


def losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_dynamic_weights_follow_design(tmp_path):
    model, trainer = fit(tmp_path / "run", max_steps=12)
    adapters = mose_adapters(model)
    moved = 0
    measured = 0
    for a in adapters:
        c = a.update_norm_ema
        if not (c[1] > 0 and c[2] > 0):
            # A layer whose visual/audio updates cannot reach the loss (the last layer's q_proj: only the
            # answer position's query counts) keeps B = 0 there: w_m = 1 while any c_m is 0.
            assert torch.equal(a.modality_weight, torch.ones(3))
            continue
        measured += 1
        cbar = c[[1, 2]].mean()
        expected = (cbar / c[[1, 2]]).clamp(0.5, 2.0)  # gamma 1, default clip
        assert torch.allclose(a.modality_weight[[1, 2]], expected, rtol=1e-5)
        assert a.modality_weight[0] == 1.0  # text is not in the balance set
        # the modality with the larger update gets the smaller weight
        assert (c[1] > c[2]) == bool(a.modality_weight[1] < a.modality_weight[2])
        moved += bool((a.modality_weight[[1, 2]] - 1).abs().max() > 1e-3)
    assert measured >= len(adapters) // 2 and moved > 0
    logged = [h for h in trainer.state.log_history if "modality_weight/visual" in h]
    assert logged[0]["modality_weight/visual"] == 1.0  # B = 0 at step 0: w stays 1 until norms exist
    assert {"task_loss", "aux_loss", "expert_load/audio/e0"} <= set(logged[-1])


def test_short_fit_lowers_the_loss(tmp_path):
    _, trainer = fit(tmp_path / "run", max_steps=24, learning_rate=2e-2)
    curve = [h["task_loss"] for h in trainer.state.log_history if "task_loss" in h]
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.05


class StopAt:
    """A callback that interrupts training after ``step`` (once the checkpoint is written)."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    control.should_training_stop = True
                return control

        return _Stop()


def test_resume_equals_uninterrupted_run(tmp_path):
    _, full = fit(tmp_path / "full", save_strategy="steps", save_steps=4)
    fit(tmp_path / "cut", save_strategy="steps", save_steps=4, callbacks=[StopAt(4)])
    _, resumed = fit(tmp_path / "cut", save_strategy="steps", save_steps=4,
                     resume=str(tmp_path / "cut" / "checkpoint-4"))
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(1, 9))  # steps 1-4 come from the checkpoint's trainer state
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)
    final_a = load_file(str(tmp_path / "full" / ADAPTER_FILE))
    final_b = load_file(str(tmp_path / "cut" / ADAPTER_FILE))
    assert final_a.keys() == final_b.keys()
    for name in final_a:  # parameters and the dynamic-weight buffers
        assert torch.allclose(final_a[name], final_b[name], rtol=1e-4, atol=1e-6), name


def test_checkpoints_hold_the_adapter_only_and_no_pickled_model(tmp_path):
    fit(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    for folder in (tmp_path / "run", tmp_path / "run" / "checkpoint-2"):
        names = {p.name for p in folder.iterdir()}
        assert {ADAPTER_FILE, "adapter_config.json", "ar_config.json", "backbone.json", "training_args.json"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin", "training_args.bin"}
        tensors = load_file(str(folder / ADAPTER_FILE))
        assert all(".mose_adapter." in k for k in tensors)
        assert any(k.endswith("update_norm_ema") for k in tensors)
        assert any(k.endswith("modality_weight") for k in tensors)
    assert json.loads((tmp_path / "run" / "backbone.json").read_text())["sizes"] == SIZES


def test_load_trained_rebuilds_the_fitted_model(tmp_path):
    model, _ = fit(tmp_path / "run", max_steps=4)
    inputs = {k: v for k, v in build_demo_model(0, **SIZES)[1](batch=3, seed=5).items()}
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    reloaded = load_trained(tmp_path / "run", ar=False)
    with torch.no_grad():
        got = reloaded(**inputs).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    with_ar = load_trained(tmp_path / "run")  # the folder's AR config (strength 0.5) changes the output
    with torch.no_grad():
        assert not torch.allclose(with_ar(**inputs).logits, expected, atol=1e-4)


def test_load_trained_rejects_a_folder_that_is_not_an_output(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_trained(tmp_path)
