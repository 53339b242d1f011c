import torch

from ctrldiff.guidance.classifier_guidance import (
    ClassifierGuidance,
    load_noisy_classifier,
    save_noisy_classifier,
    train_noisy_classifier,
)
from tests.conftest import micro_base
from tests.guidance.common import Y, run


def noisy_classifier(base):
    """A few steps on random 8x8 images whose class is their mean brightness quartile."""
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    y = torch.bucketize(x.mean((1, 2, 3)), x.mean((1, 2, 3)).quantile(torch.tensor([0.25, 0.5, 0.75])))
    return train_noisy_classifier(x, y, 4, base.scheduler, steps=60, batch_size=32, lr=3e-3, width=8, seed=0)


def test_scale_zero_is_the_base_sampler():
    base = micro_base()
    torch.testing.assert_close(run(base, ClassifierGuidance(noisy_classifier(base), 0.0)), run(base))


def test_positive_scale_raises_the_requested_log_probability():
    base = micro_base()
    clf = noisy_classifier(base)
    t0 = torch.zeros(len(Y), dtype=torch.long)

    def mean_log_prob(images):
        with torch.no_grad():
            return clf.log_prob(images, t0, Y).mean().item()

    assert mean_log_prob(run(base, ClassifierGuidance(clf, 5.0))) > mean_log_prob(run(base)) + 0.05


def test_saved_noisy_classifier_reloads(tmp_path):
    base = micro_base()
    clf = noisy_classifier(base)
    save_noisy_classifier(clf, {"arch": {"in_channels": 2, "num_classes": 4, "width": 8}}, tmp_path / "n")
    loaded = load_noisy_classifier(tmp_path / "n", base.scheduler)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    torch.testing.assert_close(loaded(x, t), clf(x, t))
