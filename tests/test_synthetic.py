"""Synthetic CA-MER generator and the manifest + safetensors data format."""

import hashlib
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader

from mosear_fast.training import (
    ManifestDataset,
    ManifestWriter,
    SyntheticCamerConfig,
    assign_subset,
    collate_samples,
    generate_camer,
    read_manifest,
    to_sequence,
)
from mosear_fast.training.labels import EMOTIONS
from mosear_fast.training.synthetic import bayes_optimal_predictions, class_log_posterior

TENSOR_FIELDS = ("label", "audio_label", "video_label", "visual", "audio", "text")


def test_same_seed_identical_different_seed_different():
    a = generate_camer(n_samples=60, n_text_tokens=3, seed=5)
    b = generate_camer(SyntheticCamerConfig(n_samples=60, n_text_tokens=3, seed=5))
    c = generate_camer(n_samples=60, n_text_tokens=3, seed=6)
    for name in TENSOR_FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.ids == b.ids and a.subsets == b.subsets
    assert not torch.equal(a.visual, c.visual) and not torch.equal(a.audio, c.audio)
    assert not torch.equal(a.label, c.label) or a.subsets != c.subsets


def test_shapes_and_configurable_dims():
    d = generate_camer(n_samples=7, n_visual_tokens=5, n_audio_tokens=2, visual_dim=12, audio_dim=6)
    assert d.visual.shape == (7, 5, 12) and d.audio.shape == (7, 2, 6) and d.text is None
    assert d.visual.dtype == torch.float32 and d.label.dtype == torch.long
    item = d[3]
    assert set(item["inputs"]) == {"visual", "audio"} and isinstance(item["label"], int)


@pytest.mark.parametrize(
    ("proportions", "expected"),
    [
        ({"video_aligned": 2, "audio_aligned": 1, "consistent": 1, "all_different": 1},
         {"video_aligned": 40, "audio_aligned": 20, "consistent": 20, "all_different": 20}),
        ({"video_aligned": 1, "audio_aligned": 1, "consistent": 1},
         {"video_aligned": 34, "audio_aligned": 33, "consistent": 33, "all_different": 0}),
        ({"audio_aligned": 0.3},
         {"video_aligned": 0, "audio_aligned": 100, "consistent": 0, "all_different": 0}),
    ],
)  # fmt: skip
def test_subset_proportions_and_labels_match_the_protocol(proportions, expected):
    d = generate_camer(n_samples=100, proportions=proportions, seed=1)
    assert {s: d.subsets.count(s) for s in expected} == expected
    for i, subset in enumerate(d.subsets):
        a, v, av = (EMOTIONS[int(t[i])] for t in (d.audio_label, d.video_label, d.label))
        assert assign_subset(a, v, av) == (None if subset == "all_different" else subset)
        if subset == "all_different":
            assert len({a, v, av}) == 3


def test_subsets_are_shuffled_and_labels_cover_the_vocabulary():
    d = generate_camer(n_samples=300, seed=2)
    assert d.subsets[:100] != ["video_aligned"] * 100
    assert set(d.label.tolist()) == set(range(len(EMOTIONS)))


def _centroid_accuracy(features, labels, n_train):
    """Nearest class mean, fitted on the first n_train samples, scored on the rest."""
    centroids = torch.stack([features[:n_train][labels[:n_train] == c].mean(0) for c in range(len(EMOTIONS))])
    predicted = torch.cdist(features[n_train:], centroids).argmin(1)
    return (predicted == labels[n_train:]).float().mean().item()


def test_token_imbalance_audio_few_and_strong_visual_many_and_weak():
    d = generate_camer(n_samples=1800, seed=3)
    n_train = 900
    audio = _centroid_accuracy(d.audio.mean(1), d.audio_label, n_train)
    one_visual = _centroid_accuracy(d.visual[:, 0], d.video_label, n_train)
    pooled_visual = _centroid_accuracy(d.visual.mean(1), d.video_label, n_train)
    chance = 1 / len(EMOTIONS)
    assert d.audio.shape[1] <= 2 < 16 <= d.visual.shape[1]
    assert audio > 0.75  # one audio token is enough
    assert one_visual < 0.25  # a single visual token is barely above chance (0.11)
    assert one_visual > chance * 0.8
    assert pooled_visual > 0.55  # ... but the video label is there when the tokens are pooled
    assert audio > pooled_visual > one_visual


def _fingerprint(d) -> str:
    h = hashlib.sha256()
    for name in TENSOR_FIELDS:
        h.update(getattr(d, name).numpy().tobytes())
    return h.hexdigest()


def test_distractor_scale_one_reproduces_the_original_data_exactly():
    # sha256 of the tensors drawn by the generator before distractor_scale existed (same config)
    d = generate_camer(n_samples=40, n_text_tokens=2, seed=7, distractor_scale=1.0,
                       proportions={"video_aligned": 1, "audio_aligned": 1, "consistent": 1, "all_different": 1})
    assert _fingerprint(d) == "67d66aafcfdc10fbf5aa2025cf4f4197e53f1964323f51e702663ed18d192881"


def test_distractor_scale_weakens_only_the_misleading_modality():
    kw = dict(n_samples=200, seed=3, proportions={"video_aligned": 1, "audio_aligned": 1, "consistent": 1,
                                                 "all_different": 1})
    full, half = generate_camer(**kw), generate_camer(**kw, distractor_scale=0.5)
    assert torch.equal(full.label, half.label) and torch.equal(full.video_label, half.video_label)
    for modality, labels, signal in (("visual", full.video_label, 0.4), ("audio", full.audio_label, 3.0)):
        misleading = labels != full.label
        assert 0 < misleading.sum() < len(full)
        shift = getattr(half, modality) - getattr(full, modality)  # same noise draws: only the signal moved
        expected = -0.5 * signal * full.prototypes[modality][labels][:, None, :]
        torch.testing.assert_close(shift[misleading], expected[misleading].expand_as(shift[misleading]))
        assert torch.equal(shift[~misleading], torch.zeros_like(shift[~misleading]))


@pytest.mark.parametrize("distractor_scale", [1.0, 0.5, 0.0])
def test_bayes_posterior_is_calibrated(distractor_scale):
    # Under the true posterior, E[max p] = accuracy and E[p(truth)] = E[sum_c p_c^2]: a wrong
    # likelihood (amplitude, prior, a missing hypothesis) breaks both.
    d = generate_camer(n_samples=6000, seed=4, distractor_scale=distractor_scale,
                       proportions={"video_aligned": 1, "audio_aligned": 2, "consistent": 1, "all_different": 1})
    p = class_log_posterior(d).exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(len(d), dtype=torch.float64))
    confidence, predicted = p.max(-1)
    accuracy = (predicted == d.label).double().mean()
    assert abs(confidence.mean() - accuracy) < 0.02
    assert abs(p[torch.arange(len(d)), d.label].mean() - (p * p).sum(-1).mean()) < 0.015


def test_bayes_optimal_beats_a_fitted_classifier_and_gains_when_distractors_weaken():
    balanced = {"video_aligned": 1, "audio_aligned": 1, "consistent": 1}
    hits = {}
    for scale in (1.0, 0.5):
        d = generate_camer(n_samples=6000, seed=5, distractor_scale=scale, proportions=balanced)
        hits[scale] = (bayes_optimal_predictions(d, balanced) == d.label).double()
        if scale == 0.5:  # nearest class mean on the pooled features: a good model, below the optimum
            features = torch.cat([d.visual.mean(1) * 32 ** 0.5, d.audio.mean(1)], 1)
            fitted = _centroid_accuracy(features, d.label, 3000)
            assert hits[scale][3000:].mean() > fitted + 0.03
    subsets = d.subsets
    for scale, hit in hits.items():
        by = {s: hit[[i for i, x in enumerate(subsets) if x == s]].mean().item() for s in balanced}
        hits[scale] = by
    assert hits[1.0]["video_aligned"] + hits[1.0]["audio_aligned"] < 1.0  # on the VA + AA line at most
    assert hits[0.5]["video_aligned"] + hits[0.5]["audio_aligned"] > 1.3  # balance can win on both
    assert min(hits[0.5].values()) > 0.5


def test_bayes_posterior_errors_name_the_argument():
    d = generate_camer(n_samples=5)
    with pytest.raises(ValueError, match="proportions"):
        class_log_posterior(d, {"video_aligned": -1})
    with pytest.raises(ValueError, match="noise"):
        class_log_posterior(generate_camer(n_samples=5, noise=0.0))


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="n_visual_tokens"):
        SyntheticCamerConfig(n_visual_tokens=0)
    with pytest.raises(ValueError, match="proportions"):
        SyntheticCamerConfig(proportions={"videoaligned": 1})
    with pytest.raises(ValueError, match="proportions"):
        SyntheticCamerConfig(proportions={"consistent": 0})
    with pytest.raises(ValueError, match="audio_signal"):
        SyntheticCamerConfig(audio_signal=float("nan"))
    with pytest.raises(ValueError, match="distractor_scale"):
        SyntheticCamerConfig(distractor_scale=-0.5)
    with pytest.raises(TypeError, match="config"):
        generate_camer({"n_samples": 3})


# ---------------------------------------------------------------- manifest + safetensors format


def test_manifest_round_trip_through_the_lazy_dataset(tmp_path):
    d = generate_camer(
        n_samples=12, n_text_tokens=2, seed=4, proportions={"video_aligned": 1, "all_different": 1}
    )
    manifest = d.write(tmp_path / "syn")
    assert manifest == tmp_path / "syn" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert rows[0]["path"] == "samples/syn-000000.safetensors" and rows[0]["subset"] == d.subsets[0]
    assert not [f for f in os.listdir(tmp_path / "syn" / "samples") if not f.endswith(".safetensors")]

    ds = ManifestDataset(manifest)
    assert len(ds) == 12
    for i in range(len(ds)):
        item, ref = ds[i], d[i]
        assert item["id"] == ref["id"] and item["subset"] == ref["subset"]
        assert (item["label"], item["audio_label"], item["video_label"]) == (
            ref["label"], ref["audio_label"], ref["video_label"])  # fmt: skip
        assert set(item["inputs"]) == {"text", "visual", "audio"}
        for m, t in ref["inputs"].items():
            assert torch.equal(item["inputs"][m], t)

    only_audio = ManifestDataset(manifest, modalities=["audio"])
    assert set(only_audio[0]["inputs"]) == {"audio"}
    with pytest.raises(ValueError, match="modalities"):
        ManifestDataset(manifest, modalities=["smell"])


def test_dataset_reads_lazily(tmp_path):
    manifest = generate_camer(n_samples=3).write(tmp_path)
    ds = ManifestDataset(manifest)  # reads the manifest only
    (tmp_path / "samples" / "syn-000002.safetensors").unlink()
    assert ds[0]["id"] == "syn-000000"
    with pytest.raises(FileNotFoundError, match="syn-000002"):
        ds[2]


def test_collate_and_to_sequence_with_a_dataloader(tmp_path):
    manifest = generate_camer(n_samples=6, n_text_tokens=2, visual_dim=8, audio_dim=8, text_dim=8).write(
        tmp_path
    )
    batch = next(iter(DataLoader(ManifestDataset(manifest), batch_size=4, collate_fn=collate_samples)))
    assert batch["inputs"]["visual"].shape == (4, 32, 8) and batch["masks"]["audio"].all()
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.long
    x, modality = to_sequence(batch["inputs"], batch["masks"])
    assert x.shape == (4, 2 + 32 + 1, 8)
    assert modality[0].tolist() == [0] * 2 + [1] * 32 + [2]


def test_to_sequence_packs_ragged_segments():
    items = [
        {"id": "a", "inputs": {"visual": torch.ones(3, 4), "audio": 2 * torch.ones(1, 4)},
         "label": 0, "audio_label": 0, "video_label": 0},
        {"id": "b", "inputs": {"visual": 3 * torch.ones(1, 4), "audio": 4 * torch.ones(2, 4)},
         "label": 1, "audio_label": 1, "video_label": 1},
    ]  # fmt: skip
    batch = collate_samples(items)
    assert batch["masks"]["visual"].tolist() == [[True] * 3, [True, False, False]]
    x, modality = to_sequence(batch["inputs"], batch["masks"])
    assert modality.tolist() == [[1, 1, 1, 2], [1, 2, 2, -1]]
    assert x[:, :, 0].tolist() == [[1, 1, 1, 2], [3, 4, 4, 0]]
    with pytest.raises(ValueError, match="one dim"):
        to_sequence(
            {"visual": torch.ones(1, 2, 4), "audio": torch.ones(1, 1, 3)},
            {"visual": torch.ones(1, 2, dtype=torch.bool), "audio": torch.ones(1, 1, dtype=torch.bool)},
        )


def test_writer_token_ids_and_validation(tmp_path):
    with ManifestWriter(tmp_path) as w:
        w.add(
            "s.1",
            {"text": torch.tensor([5, 7, 9]), "audio": torch.randn(2, 3)},
            label="Anger",
            audio_label="mad",
            video_label="calm",
            subset="x",
        )
        with pytest.raises(ValueError, match="id"):
            w.add("../evil", {"audio": torch.randn(1, 3)}, label="sad", audio_label="sad", video_label="sad")
        with pytest.raises(ValueError, match="already"):
            w.add("s.1", {"audio": torch.randn(1, 3)}, label="sad", audio_label="sad", video_label="sad")
        with pytest.raises(ValueError, match="smell"):
            w.add("s2", {"smell": torch.randn(1, 3)}, label="sad", audio_label="sad", video_label="sad")
        with pytest.raises(ValueError, match="token ids"):
            w.add(
                "s3",
                {"text": torch.ones(2, 2, dtype=torch.long)},
                label="sad",
                audio_label="sad",
                video_label="sad",
            )
        with pytest.raises(ValueError, match="label"):
            w.add("s4", {"audio": torch.randn(1, 3)}, label="glee", audio_label="sad", video_label="sad")
    item = ManifestDataset(tmp_path / "manifest.jsonl")[0]
    assert item["inputs"]["text"].tolist() == [5, 7, 9] and item["inputs"]["text"].dtype == torch.long
    assert (item["label"], item["audio_label"], item["video_label"]) == (3, 3, 2)


def test_writer_that_fails_writes_no_manifest(tmp_path):
    with pytest.raises(RuntimeError), ManifestWriter(tmp_path) as w:
        w.add("a", {"audio": torch.randn(1, 2)}, label="sad", audio_label="sad", video_label="sad")
        raise RuntimeError("boom")
    assert not (tmp_path / "manifest.jsonl").exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[1, 2]", "JSON object"),
        ('{"id": "a b", "path": "x", "label": "sad", "audio_label": "sad", "video_label": "sad"}', "id"),
        ('{"id": "a", "label": "sad", "audio_label": "sad", "video_label": "sad"}', "path"),
        ('{"id": "a", "path": "x", "label": "glee", "audio_label": "sad", "video_label": "sad"}', "glee"),
        ('{"id": "a", "path": "x", "label": "sad", "audio_label": "sad"}', "label"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_manifest_rows_name_their_line(tmp_path, line, message):
    good = '{"id": "a0", "path": "x", "label": "sad", "audio_label": "sad", "video_label": "sad"}'
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        read_manifest(manifest)
    assert "line 2" in str(info.value)


def test_duplicate_manifest_id(tmp_path):
    row = '{"id": "a0", "path": "x", "label": "sad", "audio_label": "sad", "video_label": "sad"}\n'
    (tmp_path / "m.jsonl").write_text(row * 2)
    with pytest.raises(ValueError, match="duplicate id"):
        ManifestDataset(tmp_path / "m.jsonl")


def test_modality_names_match_the_model_side():
    modality = pytest.importorskip("mosear_fast.modality")
    from mosear_fast.training import MODALITIES

    assert modality.DEFAULT_MODALITIES == MODALITIES  # ids 0, 1, 2 = text, visual, audio (DESIGN 2)
