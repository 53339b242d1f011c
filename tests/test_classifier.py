import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ctrldiff.classifier import (
    Classifier,
    ClassifierError,
    SmallCNN,
    calibration_report,
    fit_task,
    fit_temperature,
    labelled_subset,
    real_prior_weights,
    reliability,
    with_labelled_copies,
)
from ctrldiff.labels import bin_scores
from ctrldiff.oracles import oracle_scores, to_model_space, to_uint8
from ctrldiff.params import ClassifierParams


def overconfident_logits(n=2000, k=4, seed=0):
    """Logits whose argmax is right ~70% of the time, but scaled to claim near certainty."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), labels] += 1.5
    return 8.0 * logits, labels


def test_temperature_scaling_lowers_nll_of_an_overconfident_classifier():
    logits, labels = overconfident_logits()
    t = fit_temperature(logits, labels)
    assert t > 2.0  # it must soften the over-confident logits
    report = calibration_report(logits, labels, t, n_bins=15)
    assert report["nll_after"] < 0.7 * report["nll_before"]
    assert report["reliability_after"]["ece"] < report["reliability_before"]["ece"] / 2
    assert report["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))


def test_ece_is_zero_when_confidence_matches_accuracy():
    probs = torch.tensor([[0.5, 0.5]] * 4)  # confidence 0.5, argmax is class 0, right half the time
    rel = reliability(probs, torch.tensor([0, 1, 0, 1]), n_bins=10)
    assert rel["ece"] == pytest.approx(0.0)
    assert sum(rel["count"]) == 4


def test_save_load_round_trip_and_class_check(tmp_path):
    torch.manual_seed(0)
    arch = {"in_channels": 1, "num_classes": 3, "width": 8}
    clf = Classifier(
        SmallCNN(**arch),
        arch,
        temperature=1.7,
        meta={"task": "t", "classes": [0, 1, 2], "thresholds": [2.0, 1.0]},
    ).eval()
    clf.save(tmp_path / "clf")
    loaded = Classifier.load(tmp_path / "clf")
    x = torch.randn(5, 1, 12, 12)
    torch.testing.assert_close(loaded(x), clf(x))
    loaded.check_classes([0, 1, 2], [2.0, 1.0])
    with pytest.raises(ClassifierError, match="classes"):
        loaded.check_classes([0, 1, 2, 3])
    with pytest.raises(ClassifierError, match="thresholds"):
        loaded.check_classes([0, 1, 2], [5.0, 1.0])


def test_log_prob_is_calibrated_log_softmax():
    torch.manual_seed(1)
    arch = {"in_channels": 1, "num_classes": 4, "width": 8}
    clf = Classifier(SmallCNN(**arch), arch, temperature=2.0).eval()
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 3, 1])
    expected = F.log_softmax(clf.net(x) / 2.0, -1)[torch.arange(3), y]
    torch.testing.assert_close(clf.log_prob(x, y), expected)


def test_corrupt_or_missing_classifier_gives_a_clear_error(tmp_path):
    with pytest.raises(ClassifierError, match="no saved classifier"):
        Classifier.load(tmp_path)
    arch = {"in_channels": 1, "num_classes": 2, "width": 8}
    Classifier(SmallCNN(**arch), arch).save(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ClassifierError, match="cannot load"):
        Classifier.load(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({"arch": {"bogus": 1}}))
    with pytest.raises(ClassifierError, match="cannot load"):
        Classifier.load(tmp_path / "c")


def test_labelled_subset_draws_n_labelled_rows_and_names_the_task_when_too_many():
    table = pd.DataFrame({"y_a": [0, 1, -1, 1, 0, 1], "split": ["train"] * 4 + ["val"] * 2})
    meta = {"tasks": {"a": {"column": "y_a"}}}
    part = labelled_subset(table, meta, "a", 4, seed=0)
    assert len(part) == 4 and (part.y_a >= 0).all() and part.index.is_unique
    assert labelled_subset(table, meta, "a", 4, seed=0).equals(part)
    with pytest.raises(ClassifierError, match="6 labelled images of task 'a'; the data has 5"):
        labelled_subset(table, meta, "a", 6, seed=0)


def test_prior_weights_give_the_copies_the_real_images_class_shares():
    y = torch.tensor([0, 1, 2, 3, 3, 0, 0, 0, 1, 3])  # 5 real images (shares 1/5, 1/5, 1/5, 2/5), 5 copies
    w = real_prior_weights(y, 5, 4)
    weighted = torch.bincount(y, weights=w[y], minlength=4)
    torch.testing.assert_close(weighted / weighted.sum(), torch.tensor([0.2, 0.2, 0.2, 0.4]))
    assert w[0] < 1 < w[2]  # the class the copies crowd weighs less, the one they miss more
    # a class absent from every image gets weight 0, not a division by zero
    assert real_prior_weights(torch.tensor([0, 1, 0]), 2, 3)[2] == 0


def test_weighted_temperature_fit_follows_the_weighted_nll():
    # class 1's examples are confidently wrong: weighing them up must soften the fitted temperature
    logits = torch.tensor([[4.0, 0.0]] * 8 + [[2.0, 0.0]] * 2)
    labels = torch.tensor([0] * 8 + [1] * 2)
    plain = fit_temperature(logits, labels)
    weighted = fit_temperature(logits, labels, torch.tensor([1.0, 4.0]))
    assert weighted > plain


def test_copies_are_shifted_noisy_and_labelled_by_the_oracle_not_inherited():
    pixels = np.zeros((6, 28, 28), dtype=np.uint8)
    pixels[:, 8:20, 12:16] = 255  # a clean bar on black: small as a JPEG
    spec = {"score": "jpeg_bytes", "jpeg_quality": 95}
    clean = oracle_scores(pixels, spec)[0]
    spec["thresholds"] = [clean + 200.0, clean + 100.0, clean + 1.0]  # clean is the most compressible class
    x, y = to_model_space(pixels), torch.full((6,), 3)
    cfg = ClassifierParams(copies=2, copy_shift=2, copy_noise=16.0)

    x2, y2 = with_labelled_copies(x, y, spec, cfg, seed=0)
    assert x2.shape == (18, 1, 28, 28) and torch.equal(x2[:6], x) and torch.equal(y2[:6], y)
    copies = to_uint8(x2[6:])
    assert (copies != pixels[0]).any(axis=(1, 2)).all()  # every copy is noisy
    assert np.array_equal(y2[6:].numpy(), bin_scores(oracle_scores(copies, spec), spec["thresholds"]))
    assert (y2[6:] < 3).any()  # noise costs JPEG bytes: some copies leave the clean images' class
    x3, y3 = with_labelled_copies(x, y, spec, cfg, seed=0)
    assert torch.equal(x3, x2) and torch.equal(y3, y2)  # seeded

    shifted = to_uint8(with_labelled_copies(x, y, spec, cfg.model_copy(update={"copy_noise": 0.0}), 1)[0][6:])
    assert all(
        any(
            np.array_equal(c, np.roll(pixels[0], (dy, dx), (0, 1)))
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        )
        for c in shifted
    )  # without noise a copy is the image rolled by at most 2 pixels
    assert with_labelled_copies(x, y, spec, cfg.model_copy(update={"copies": 0}), seed=0)[0] is x


def test_dct_size_model_refuses_colour_jpeg_and_names_the_key():
    meta = {"channels": 3, "tasks": {"compressibility": {"score": "jpeg_bytes", "classes": [0, 1]}}}
    with pytest.raises(ClassifierError, match="classifier.compressibility_model: cnn"):
        fit_task(
            pd.DataFrame(), meta, "compressibility", ClassifierParams(compressibility_model="dct"), seed=0
        )
