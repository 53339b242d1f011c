import numpy as np

from ctrldiff.labels import bin_scores, disjoint_halves, quantile_thresholds, stratified_split


def test_quantile_binning_gives_near_equal_classes():
    scores = np.random.default_rng(0).lognormal(6.5, 0.2, 5000)
    classes = bin_scores(scores, quantile_thresholds(scores, 4))
    counts = np.bincount(classes, minlength=4)
    assert counts.min() >= 1240 and counts.max() <= 1260


def test_class_zero_holds_the_highest_scores():
    thresholds = quantile_thresholds(np.arange(100.0), 4)
    assert thresholds == sorted(thresholds, reverse=True)
    assert bin_scores(np.array([99.0, 60.0, 30.0, 0.0]), thresholds).tolist() == [0, 1, 2, 3]


def test_fixed_thresholds_in_any_order():
    # the paper's 110 / 85 / 60 KB cuts
    sizes = np.array([120_000, 100_000, 70_000, 50_000])
    assert bin_scores(sizes, [60_000, 110_000, 85_000]).tolist() == [0, 1, 2, 3]


def test_stratified_split_keeps_each_class_share_and_is_seeded():
    strata = np.repeat(np.arange(4), [100, 200, 300, 400])
    split = stratified_split(strata, 0.2, seed=3)
    for k, n in enumerate([100, 200, 300, 400]):
        assert (split[strata == k] == "val").sum() == n // 5
    assert (split == stratified_split(strata, 0.2, seed=3)).all()
    assert (split != stratified_split(strata, 0.2, seed=4)).any()


def test_disjoint_halves_cover_everything_once():
    half = disjoint_halves(11, seed=0, names=("a", "b"))
    assert sorted(set(half)) == ["a", "b"]
    assert (half == "a").sum() == 5 and (half == "b").sum() == 6
