"""mosear-demo (the README's first command) in its quick mode: the protocol's code paths on a tiny
configuration, the results.json contract, seed statistics, and the README block rendered from the
committed results."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from mosear_fast.training import demo
from mosear_fast.training.demo_ar import NO_AR, choose
from mosear_fast.training.demo_fit import BestEpoch
from mosear_fast.training.demo_report import BEGIN, END, claims, render_markdown, replace_block
from mosear_fast.training.demo_stats import interval, summarize, t975
from mosear_fast.training.demo_study import REFERENCES, VARIANTS

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("video_aligned", "audio_aligned", "consistent", "gap", "mean3")


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "two"
    assert demo.main(["--quick", "--no-progress", "--seeds", "2", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_demo_writes_the_results_contract(two_seeds, capsys):
    out, results = two_seeds
    assert results["settings"]["seeds"] == 2 and results["settings"]["distractor_scale"] == 0.5
    assert list(results["variants"]) == list(VARIANTS) and list(results["references"]) == list(REFERENCES)
    for group in ("variants", "references"):
        for name, entry in results[group].items():
            assert set(METRICS) <= set(entry) and set(entry["ci95"]) == set(METRICS), name
            for metric in METRICS:
                values = [s[metric] for s in entry["per_seed"]]
                assert entry[metric] == pytest.approx(sum(values) / 2)
                low, high = entry["ci95"][metric]
                assert low <= entry[metric] <= high
            va, aa, c = (entry[m] for m in METRICS[:3])
            assert entry["mean3"] == pytest.approx((va + aa + c) / 3) and entry["gap"] == pytest.approx(aa - va)
    # paired differences: per seed, against the same seed's baseline
    base = results["variants"]["baseline"]["per_seed"]
    mose = results["variants"]["+ MoSE"]
    assert mose["vs_baseline"]["mean3"]["per_seed"] == pytest.approx(
        [m["mean3"] - b["mean3"] for m, b in zip(mose["per_seed"], base, strict=True)])
    for name in ("demo.png", "tradeoff.png", "results.md"):
        assert (out / name).stat().st_size > 0
    assert (out / "mose" / "adapter_model.safetensors").is_file()  # the kept MoSE folder, PEFT's format
    assert not (out / ".work").exists()
    assert len(results["choices"]) == 2 and {"ar", "mose_ar", "mose_size", "lora_rank"} <= set(results["choices"][0])
    curves = results["tradeoff"]["curves"]
    assert set(curves) == {"backbone", "mose"} and len(curves["backbone"]) == len(demo.QUICK.ar_options)
    for curve in curves["backbone"].values():
        assert len(curve["mean3"]) == len(demo.QUICK.ar_strengths)


def test_the_test_split_is_scored_once_with_the_validation_choices(two_seeds):
    """The kept MoSE folder (seed 0) reloads into the '+ MoSE + AR' numbers; Bayes is the best mean3."""
    from mosear_fast.training import load_trained
    from mosear_fast.training.demo_eval import EvalSet, evaluate_camer
    from mosear_fast.training.demo_stats import camer_metrics
    from mosear_fast.training.demo_study import build_splits

    out, results = two_seeds
    data, idx = build_splits(demo.QUICK, 0)
    assert not set(idx["test"]) & (set(idx["validation"]) | set(idx["fit"]) | set(idx["backbone"]))
    assert not set(idx["validation"]) & (set(idx["fit"]) | set(idx["backbone"]))
    metrics = camer_metrics(evaluate_camer(load_trained(out / "mose"), EvalSet(data, idx["test"])))
    assert metrics == pytest.approx(results["per_seed"][0]["variants"]["+ MoSE + AR"]["metrics"])
    ar_file = json.loads((out / "mose" / "ar_config.json").read_text())
    chosen = results["choices"][0]["mose_ar"]
    assert (ar_file is None) == (chosen["option"] == NO_AR)


@pytest.mark.slow
def test_same_seed_same_numbers(two_seeds, tmp_path):
    _, results = two_seeds
    assert demo.main(["--quick", "--no-progress", "--seed", "1", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["per_seed"][0]["variants"] == results["per_seed"][1]["variants"]
    assert "ci95" not in again["variants"]["baseline"]  # one seed: no interval


@pytest.mark.parametrize(("argv", "name"), [(["--seeds", "0"], "--seeds"), (["--threads", "0"], "--threads")])
def test_demo_bad_argument_is_one_line_error(capsys, argv, name):
    assert demo.main(["--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- statistics and choices


def test_interval_is_the_student_t_interval():
    stats = interval([1.0, 2.0, 6.0])
    half = t975(2) * math.sqrt(7.0) / math.sqrt(3)  # sample sd of (1, 2, 6) is sqrt(7)
    assert stats["mean"] == 3.0 and stats["ci95"] == pytest.approx([3.0 - half, 3.0 + half])
    assert t975(2) == 4.303 and t975(1000) == 1.96
    assert "ci95" not in interval([5.0])


def test_summarize_pairs_differences_within_seeds():
    base = [dict.fromkeys(METRICS, v) for v in (10.0, 30.0)]
    other = [dict.fromkeys(METRICS, v) for v in (11.0, 31.0)]
    out = summarize(other, base)
    diff = out["vs_baseline"]["mean3"]
    assert diff["mean"] == pytest.approx(1.0) and diff["ci95"] == pytest.approx([1.0, 1.0])  # no spread left
    assert out["ci95"]["mean3"][1] - out["ci95"]["mean3"][0] > 100  # the unpaired spread is large


def _curve(*mean3s):
    return [dict.fromkeys(METRICS, v) for v in mean3s]


def test_ar_choice_is_no_ar_unless_validation_supports_it():
    strengths = (0.0, 0.5, 1.0)
    assert choose({"mass": _curve(50, 49, 40), "contribution": _curve(50, 50, 45)}, strengths) == (NO_AR, 0.0)
    assert choose({"mass": _curve(50, 51, 53), "contribution": _curve(50, 53, 52)}, strengths) == ("mass", 1.0)


def test_best_epoch_keeps_the_best_validation_epoch():
    model = torch.nn.Linear(2, 2)
    scores = iter([40.0, 55.0, 50.0])
    keeper = BestEpoch(model, lambda m: {"mean3": next(scores)})
    states = []
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        states.append(copy.deepcopy(model.state_dict()))
        keeper.on_epoch_end(None, None, None)
    keeper.on_train_end(None, None, None)
    assert keeper.best_epoch == 2 and torch.equal(model.weight, states[1]["weight"])


# ---------------------------------------------------------------- the README is rendered, not typed


def test_readme_demo_block_is_rendered_from_the_committed_results():
    results = json.loads((ROOT / "docs" / "demo" / "results.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = render_markdown(results, charts=("docs/demo/demo.png", "docs/demo/tradeoff.png"))
    assert replace_block(readme, block) == readme
    assert results["settings"]["seeds"] >= 3 and "ci95" in results["variants"]["+ MoSE"]
    for name in ("bayes_optimal", "full_finetune", "lora"):
        assert "mean3" in results["references"][name]
    for chart in ("demo.png", "tradeoff.png"):
        assert (ROOT / "docs" / "demo" / chart).stat().st_size > 0


def test_claims_follow_the_intervals():
    def entry(**diffs):
        return {"vs_baseline": {m: {"mean": (lo + hi) / 2, "ci95": [lo, hi], "per_seed": [lo, (lo + hi) / 2, hi]}
                                for m, (lo, hi) in diffs.items()},
                **dict.fromkeys(METRICS, 50.0), "ci95": {}, "per_seed": [{}, {}, {}]}

    zero = {m: (-1.0, 1.0) for m in METRICS}
    trade = entry(**{**zero, "gap": (-20.0, -10.0), "audio_aligned": (-12.0, -6.0), "video_aligned": (2.0, 5.0)})
    gain = entry(**{**zero, "gap": (-9.0, -3.0), "video_aligned": (3.0, 9.0), "mean3": (1.0, 3.0)})
    wider = entry(**{**zero, "gap": (4.0, 9.0)})
    results = {"variants": {"baseline": entry(**zero), "+ AR": trade, "+ MoSE": gain, "+ MoSE + AR": wider},
               "references": {n: entry(**zero) for n in REFERENCES},
               "choices": [{"ar": {"option": "mass"}, "mose_ar": {"option": NO_AR}}] * 3}
    text = "\n".join(claims(results))
    assert "AR (inference only) reduces the audio bias without an audio/visual trade-off*: only with a trade-off" \
        in text
    assert "MoSE (fine-tuning, backbone frozen) reduces the audio bias without an audio/visual trade-off*: " \
           "reproduced" in text
    assert "MoSE with AR reduces the audio bias without an audio/visual trade-off*: no (the gap widens)" in text
    assert text.count("Validation chose no AR in every seed") == 1  # only for MoSE + AR here
    assert "VA + AA -5.5 ± " in text  # the trade: mean of the per-seed sums of VA and AA changes


def test_replace_block_needs_one_block():
    assert replace_block(f"a\n{BEGIN}\nold\n{END}\nb", "new\n") == f"a\n{BEGIN}\nnew\n{END}\nb"
    with pytest.raises(ValueError, match="block"):
        replace_block("no markers", "x")
