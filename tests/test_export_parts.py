"""The export's pure parts, without exporting a model: validation rules (padding masks, atol, status),
the decoder's feed plan and greedy step, the fused ops' attribute codec and shape/type rules (shared by
the onnxruntime custom ops and the TensorRT plugins), TensorRT build details, shape plans, staging
cleanup, and the one-line errors for corrupt weights files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mosear_fast.export import fused
from mosear_fast.export.files import MARKER, is_stale_staging, remove_stale_staging, staged_output
from mosear_fast.export.generate import (
    DecodePlan,
    GeneratorError,
    greedy_step,
    ort_device_of,
    preferred_providers,
    step_inputs,
)
from mosear_fast.export.report import NOT_VALIDATED, validation_summary
from mosear_fast.export.shapes import AxisRange, parse_range, tensorrt_profile, with_past_validation_shapes
from mosear_fast.export.tensorrt_build import builder_flags_to_clear
from mosear_fast.export.validate import Tolerance, compare_outputs, not_run, within_tolerance

# --- validation --------------------------------------------------------------------------------------


def test_padding_positions_are_not_compared():
    expected = torch.randn(2, 4, 5)
    actual = expected.numpy().copy()
    actual[1, 0] += 100.0  # a left-padding position: its logits mean nothing
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]).bool()[:, :, None]
    tol = Tolerance(rtol=1e-5, atol=None)
    masked = compare_outputs({"logits": actual}, {"logits": expected}, tol, {"logits": mask})["logits"]
    assert masked["pass"] and masked["compared"] == 7 * 5 and masked["rel_error"] < 1e-12
    unmasked = compare_outputs({"logits": actual}, {"logits": expected}, tol)["logits"]
    assert not unmasked["pass"]
    actual[0, 2] += 1.0  # a real position still counts
    assert not compare_outputs({"logits": actual}, {"logits": expected}, tol, {"logits": mask})["logits"]["pass"]


def test_atol_bounds_the_largest_difference():
    expected = torch.full((4, 8), 100.0)
    actual = expected.numpy().copy()
    actual[0, 0] += 0.01  # relative error 3e-5 over the tensor: within rtol 1e-4
    loose = compare_outputs({"o": actual}, {"o": expected}, Tolerance(rtol=1e-4, atol=0.02))["o"]
    tight = compare_outputs({"o": actual}, {"o": expected}, Tolerance(rtol=1e-4, atol=0.005))["o"]
    assert loose["pass"] and not tight["pass"]
    assert abs(loose["max_abs_diff"] - 0.01) < 1e-5  # float32 rounding of 100.01
    assert within_tolerance(1e-6, 0.5, Tolerance(1e-5, 1.0)) and not within_tolerance(1e-6, 1.5, Tolerance(1e-5, 1.0))
    assert not within_tolerance(float("nan"), 0.0, Tolerance(1e-5, None))


def test_not_validated_is_its_own_status():
    entries = not_run([("opt", 2, 9), ("decode", 2, 1, 9)], ["logits"], "bf16 on the CPU provider")
    summary = validation_summary(entries)
    assert summary == {"pass": False, "hard_fail": False, "status": NOT_VALIDATED}
    assert entries[1]["past"] == 9
    ok = [{"outputs": {"logits": {"pass": True}}}]
    assert validation_summary(ok)["status"] == "passed"
    assert validation_summary([{"outputs": {"logits": {"pass": False}}}])["status"] == "failed"


# --- the decoder's feed plan ----------------------------------------------------------------------


def _config(dtype="float32", modality=True):
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
              {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "past_seq + seq"]}]
    if modality:
        inputs.append({"name": "modality_ids", "dtype": "int64", "shape": ["batch", "seq"], "range": [-1, 3]})
    else:
        inputs.append({"name": "visual", "dtype": "float32", "shape": ["batch", 4, 8]})
    inputs.append({"name": "past_modality_ids", "dtype": "int64", "shape": ["batch", "past_seq"], "range": [-1, 3]})
    for i in range(2):
        for kind in ("key", "value"):
            inputs.append({"name": f"past_key_values.{i}.{kind}", "dtype": dtype, "shape": ["batch", 2, "past_seq", 8]})
    outputs = [{"name": n} for n in ["logits", "present_modality_ids", "present.0.key", "present.0.value",
                                     "present.1.key", "present.1.value"]]
    return {"inputs": inputs, "outputs": outputs, "interface": {
        "kv_cache": {"dtype": dtype}, "generation": {"eos_token_id": [2], "pad_token_id": 0}}}


def test_decode_plan_links_each_present_output_to_its_past_input():
    plan = DecodePlan.from_config(_config())
    assert plan.feedback() == {"present_modality_ids": "past_modality_ids",
                               "present.0.key": "past_key_values.0.key", "present.0.value": "past_key_values.0.value",
                               "present.1.key": "past_key_values.1.key", "present.1.value": "past_key_values.1.value"}
    empty = plan.empty_past(3)
    assert empty["past_key_values.1.value"].shape == (3, 2, 0, 8) and empty["past_modality_ids"].shape == (3, 0)
    assert plan.takes_modality_ids and plan.feature_inputs == () and plan.num_modalities == 3
    av = DecodePlan.from_config(_config(modality=False))
    assert av.feature_inputs == ("visual",) and not av.takes_modality_ids
    with pytest.raises(GeneratorError, match="bfloat16"):
        DecodePlan.from_config(_config("bfloat16")).empty_past(1)
    prefill_only = _config()
    del prefill_only["interface"]["kv_cache"]
    with pytest.raises(GeneratorError, match="--with-past"):
        DecodePlan.from_config(prefill_only)
    broken = _config()
    broken["outputs"] = broken["outputs"][:-1]
    with pytest.raises(GeneratorError, match="present.1.value"):
        DecodePlan.from_config(broken).feedback()


def test_greedy_step_and_decode_inputs():
    logits = np.array([[0.0, 1.0, 5.0], [3.0, 0.0, 1.0]], dtype=np.float32)
    tokens, finished = greedy_step(logits, np.zeros(2, bool), (2,), 0)
    assert tokens.tolist() == [2, 0] and finished.tolist() == [True, False]
    tokens, finished = greedy_step(logits, finished, (2,), 0)  # a finished row continues with the pad token
    assert tokens.tolist() == [0, 0] and finished.tolist() == [True, False]
    tokens, finished = greedy_step(logits, np.zeros(2, bool), (), None)  # EOS off
    assert tokens.tolist() == [2, 0] and not finished.any()
    plan = DecodePlan.from_config(_config())
    feeds = step_inputs(np.array([5, 6]), np.array([[0, 1], [1, 1]]), plan, {})
    assert feeds["input_ids"].tolist() == [[5], [6]] and feeds["modality_ids"].tolist() == [[0], [0]]
    assert feeds["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]


def test_cuda_branch_device_and_providers():
    assert ort_device_of("CUDAExecutionProvider") == ("cuda", 0)
    assert ort_device_of("CPUExecutionProvider") == ("cpu", 0)
    assert preferred_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert preferred_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


# --- fused ops: the contract the custom ops and plugins share -------------------------------------


def test_ar_attribute_codec_round_trips():
    attrs = fused.encode_ar_attrs(num_modalities=3, balance=(1, 2), target=(0.25, 0.75), strength=0.5,
                                  threshold=0.1, modality_bias=(0.0, -1.5, 0.5), causal=True, scale=0.125)
    assert set(attrs) == set(fused.AR_ATTRS) and all(isinstance(attrs[k], t) for k, t in fused.AR_ATTRS.items())
    back = fused.decode_ar_attrs(attrs)
    assert back == {"num_modalities": 3, "balance": (1, 2), "target": (0.25, 0.75), "strength": 0.5,
                    "threshold": 0.1, "modality_bias": (0.0, -1.5, 0.5), "causal": True, "scale": 0.125,
                    "window": None, "softcap": None, "balance_by": "mass"}
    options = fused.encode_ar_attrs(num_modalities=3, balance=(1, 2), target=None, strength=0.5, threshold=0.0,
                                    modality_bias=None, causal=True, scale=1.0, window=4, softcap=30.0,
                                    balance_by="contribution")
    assert {k: fused.decode_ar_attrs(options)[k] for k in fused.AR_ATTR_DEFAULTS} == {
        "window": 4, "softcap": 30.0, "balance_by": "contribution"}
    # a graph written before window/softcap/balance_by existed reads as the op's defaults
    older = fused.decode_ar_attrs({k: v for k, v in options.items() if k not in fused.AR_ATTR_DEFAULTS})
    assert (older["window"], older["softcap"], older["balance_by"]) == (None, None, "mass")
    plain = fused.decode_ar_attrs(fused.encode_ar_attrs(num_modalities=3, balance=(1, 2), target=None, strength=0.0,
                                                        threshold=0.0, modality_bias=None, causal=False, scale=1.0))
    assert plain["target"] is None and plain["modality_bias"] is None and plain["causal"] is False
    per_head = torch.rand(4, 2) + 0.1
    decoded = fused.decode_ar_attrs(fused.encode_ar_attrs(num_modalities=3, balance=(1, 2), target=per_head,
                                                          strength=1.0, threshold=0.0, modality_bias=None,
                                                          causal=True, scale=1.0))["target"]
    assert torch.equal(decoded, per_head)
    with pytest.raises(ValueError, match="scale"):
        fused.decode_ar_attrs({k: v for k, v in attrs.items() if k != "scale"})


def test_fused_shape_and_type_rules():
    f32, i64 = torch.float32, torch.int64
    shape, dtype = fused.ar_output_spec([(2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8), (2, 7), (2, 5)],
                                        [f32, f32, f32, i64, torch.bool])
    assert shape == (2, 4, 5, 8) and dtype == f32
    symbolic, _ = fused.ar_output_spec([(None, 4, None, 8), (None, 2, None, 8), (None, 2, None, 8), (None, None),
                                        (None, None)], [torch.float16] * 3 + [i64, torch.bool])
    assert symbolic == (None, 4, None, 8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        fused.ar_output_spec([(2, 3, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8), (2, 7), (2, 5)],
                             [f32, f32, f32, i64, torch.bool])
    with pytest.raises(ValueError, match="one float dtype"):
        fused.ar_output_spec([(2, 4, 5, 8)] * 3 + [(2, 7), (2, 5)], [f32, torch.float16, f32, i64, torch.bool])
    with pytest.raises(ValueError, match="rank 2"):
        fused.ar_output_spec([(2, 4, 5, 8)] * 3 + [(2, 7, 1), (2, 5)], [f32] * 3 + [i64, torch.bool])
    mose_shapes = [(6, 16), (6,), (6, 2), (6, 2), (3, 4, 16), (3, 2, 12, 4), (3,), (6, 12)]
    assert fused.mose_output_spec(mose_shapes, [f32, i64, i64, f32, f32, f32, f32, f32]) == ((6, 12), f32)
    half = torch.float16
    assert fused.mose_output_spec(mose_shapes, [half, i64, i64, f32, half, half, f32, half])[1] == half
    with pytest.raises(ValueError, match="gate and scale must be float32"):
        fused.mose_output_spec(mose_shapes, [half, i64, i64, half, half, half, f32, half])


def test_ort_custom_op_bodies_match_the_ops():
    from mosear_fast import ar_attention, mose_lora
    from mosear_fast.export.ort_custom_ops import run_ar, run_mose

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 7, 8,
                                                                                                        generator=g)
    ids = torch.tensor([[0, 1, 1, 2, 2, 0, -1]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    attrs = fused.encode_ar_attrs(num_modalities=3, balance=(1, 2), target=None, strength=0.7, threshold=0.0,
                                  modality_bias=None, causal=True, scale=8 ** -0.5)
    expected = ar_attention(q, k, v, ids, num_modalities=3, strength=0.7, query_mask=mask, backend="torch")
    assert np.allclose(run_ar(q.numpy(), k.numpy(), v.numpy(), ids.numpy(), mask.numpy(), **attrs), expected.numpy(),
                       atol=1e-6)
    options = {"window": 3, "softcap": 2.0, "balance_by": "contribution"}
    attrs = fused.encode_ar_attrs(num_modalities=3, balance=(1, 2), target=None, strength=0.7, threshold=0.0,
                                  modality_bias=None, causal=True, scale=8 ** -0.5, **options)
    expected_options = ar_attention(q, k, v, ids, num_modalities=3, strength=0.7, query_mask=mask, backend="torch",
                                    **options)
    assert not torch.allclose(expected_options, expected)  # the options change the result: they must travel
    assert np.allclose(run_ar(q.numpy(), k.numpy(), v.numpy(), ids.numpy(), mask.numpy(), **attrs),
                       expected_options.numpy(), atol=1e-6)
    x, out = torch.randn(6, 16, generator=g), torch.randn(6, 12, generator=g)
    modality, expert = torch.tensor([0, 1, 2, -1, 1, 0]), torch.randint(0, 2, (6, 1), generator=g)
    gate, A, B = torch.rand(6, 1, generator=g), torch.randn(3, 4, 16, generator=g), torch.randn(3, 2, 12, 4,
                                                                                                 generator=g)
    scale = torch.tensor([0.5, 1.0, 2.0])
    want = mose_lora(x, modality, expert, gate, A, B, scale, out, backend="torch")
    got = run_mose(*(t.numpy() for t in (x, modality, expert, gate, A, B, scale, out)))
    assert np.allclose(got, want.numpy(), atol=1e-6) and not np.allclose(got, out.numpy())


# --- TensorRT build details and shape plans -------------------------------------------------------


def test_tf32_is_cleared_for_fp32_engines_only():
    flags = ["FP16", "TF32", "BF16"]
    assert builder_flags_to_clear("fp32", available=flags) == ["TF32"]
    assert builder_flags_to_clear("fp16", available=flags) == []
    assert builder_flags_to_clear("fp32", available=["FP16"]) == []


def test_profile_and_validation_shapes_of_a_decoder():
    from mosear_fast.export.sources import InputSpec

    batch, seq, past = AxisRange("batch", 1, 2, 4), AxisRange("seq", 1, 9, 16), AxisRange("past_seq", 0, 9, 16)
    specs = [InputSpec("attention_mask", "int64", ("batch", "past_seq + seq")),
             InputSpec("past_key_values.0.key", "float32", ("batch", 2, "past_seq", 8))]
    profile = tensorrt_profile(specs, batch, seq, past)
    assert profile["attention_mask"] == ((1, 1), (2, 18), (4, 32))
    assert profile["past_key_values.0.key"] == ((1, 2, 0, 8), (2, 2, 9, 8), (4, 2, 16, 8))
    cases = with_past_validation_shapes(batch, seq, past, prefill_min=3)
    assert ("prefill-opt", 2, 9, 0) in cases and ("decode-opt", 2, 1, 9) in cases and ("decode-max", 4, 1, 16) in cases
    assert all(p == 0 or t <= 3 for _, _, t, p in cases)
    assert len({c[1:] for c in cases}) == len(cases)
    assert parse_range("0:4:8", name="past_seq", option="--past", minimum=0).min == 0
    with pytest.raises(ValueError, match="MIN >= 1"):
        parse_range("0:4:8", name="seq", option="--seq")


# --- staging folders ------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_of_a_killed_export_is_removed_and_nothing_else(tmp_path):
    import socket
    import time

    out = tmp_path / "exported"
    host = socket.gethostname()
    stale = tmp_path / ".exported.partial-dead"
    live = tmp_path / ".exported.partial-live"
    foreign_old = tmp_path / ".exported.partial-old-host"
    not_ours = tmp_path / ".exported.partial-user"
    other_out = tmp_path / ".other.partial-dead"
    for folder, info in ((stale, {"pid": _dead_pid(), "host": host, "created": time.time()}),
                         (live, {"pid": os.getpid(), "host": host, "created": time.time()}),
                         (foreign_old, {"pid": 1, "host": "elsewhere", "created": time.time() - 3 * 86400}),
                         (other_out, {"pid": _dead_pid(), "host": host, "created": time.time()})):
        folder.mkdir()
        (folder / MARKER).write_text(json.dumps(info))
        (folder / "model.onnx").write_bytes(b"partial")
    not_ours.mkdir()
    assert is_stale_staging(stale) and not is_stale_staging(live) and is_stale_staging(foreign_old)
    assert not is_stale_staging(not_ours)
    removed = remove_stale_staging(out)
    assert sorted(removed) == sorted([stale.name, foreign_old.name])
    assert live.exists() and not_ours.exists() and other_out.exists()
    with staged_output(out, overwrite=False) as stage:
        (stage / "model.onnx").write_bytes(b"graph")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]  # the marker does not reach the result


# --- corrupt weights files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    from tests.test_export import write_trained_folder

    return write_trained_folder(tmp_path_factory.mktemp("corrupt") / "run")


@pytest.mark.parametrize("name, fragment", [("adapter_model.safetensors", "MoSE adapter tensors"),
                                            ("backbone.safetensors", "backbone weights")])
def test_corrupt_weights_file(trained_folder, tmp_path, capsys, name, fragment):
    import shutil

    from mosear_fast.export.cli import main
    from mosear_fast.trained import load_trained

    folder = tmp_path / "run"
    shutil.copytree(trained_folder, folder)
    (folder / name).write_bytes(b"\x00not safetensors")
    with pytest.raises(ValueError, match=f"not a readable safetensors file \\(the {fragment}"):
        load_trained(folder)
    code = main([str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and name in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()


def test_demo_refuses_adapter(tmp_path, capsys):
    from mosear_fast.export.cli import main

    code = main(["demo", "--adapter", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--adapter" in err[0] and "demo model" in err[0]
    assert not (tmp_path / "out").exists()


def test_past_needs_with_past(tmp_path, capsys):
    from mosear_fast.export.cli import main

    code = main(["demo", "--past", "0:4:8", "--out", str(tmp_path / "out")])
    assert code == 2 and "--with-past" in capsys.readouterr().err


def test_greedy_decode_comparison():
    from mosear_fast.export.decode_check import compare_decoding

    ref_logits = np.zeros((3, 1, 4), dtype=np.float32)
    for step, token in enumerate([1, 2, 3]):
        ref_logits[step, 0, token] = 10.0
    ref_tokens = np.array([[1, 2, 3]])
    same = compare_decoding(ref_tokens.copy(), ref_logits.copy(), ref_tokens, ref_logits, 1e-5)
    assert same["pass"] and same["tokens_match"] and same["tokens_equal"] == 3 and same["max_step_rel_error"] == 0
    drifted = ref_logits.copy()
    drifted[0, 0, 0] += 0.5  # logits off by more than the tolerance, tokens still equal
    assert not compare_decoding(ref_tokens.copy(), drifted, ref_tokens, ref_logits, 1e-5)["pass"]
    other = np.array([[1, 0, 3]])  # step 1 picks token 0, whose reference logit is 10 below token 2's
    result = compare_decoding(other, ref_logits.copy(), ref_tokens, ref_logits, 1e-5)
    assert not result["pass"] and result["first_mismatch_step"] == 1 and result["tokens_equal"] == 1
    assert result["near_tie"] is False and len(result["step_rel_errors"]) == 2  # nothing compared after it
    tie = ref_logits.copy()
    tie[1, 0, 0] = 10.0 - 1e-6  # a near tie in the reference: a low-precision graph may pick either
    assert compare_decoding(other, tie.copy(), ref_tokens, tie, 1e-5)["near_tie"] is True


def test_av_decoder_reads_placeholders_in_the_prompt_only():
    """A generated token whose id is a placeholder's is text (as in generate), not a feature slot."""
    from mosear_fast import apply_mosear, demo_config
    from mosear_fast import av_model as av
    from mosear_fast.export.sources import AudioVisualExport
    from mosear_fast.export.with_past import cache_from, with_past

    model, _ = av.build_demo_model(1, n_visual=4, n_audio=2, hidden=32, intermediate=64, layers=1)
    apply_mosear(model.llm, mose=demo_config.mose_config(init_weights=False), ar=demo_config.ar_config())
    decoder = with_past(AudioVisualExport(model.eval()))
    prompt = decoder.example_inputs(2, 9, seed=0, past=0)
    with torch.no_grad():
        out = decoder(*prompt)
        ids, visual, audio, mask = prompt[:4]
        assert torch.equal(out[1], av.placeholder_modality_ids(ids, mask))  # the prompt's ids from placeholders
        step = (torch.full((2, 1), av.VISUAL_ID), visual, audio, torch.cat([mask, torch.ones(2, 1, dtype=torch.long)],
                                                                             1), out[1], *out[2:])
        next_out = decoder(*step)
        assert next_out[1][:, -1].tolist() == [0, 0]  # text, not visual
        plain = model.llm(input_ids=step[0], attention_mask=step[3], modality_ids=next_out[1],
                          position_ids=(step[3].cumsum(-1) - 1)[:, -1:],
                          past_key_values=cache_from(list(out[2:])), use_cache=True).logits
    assert torch.allclose(next_out[0], plain, atol=1e-6)  # the token's own embedding, not a projected feature
