import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.fft import dctn

from ctrldiff.classifier import Classifier
from ctrldiff.jpeg_size import JpegSizeNet, fit_jpeg_size, ordinal_log_probs, quantisation_table
from ctrldiff.labels import bin_scores, quantile_thresholds
from ctrldiff.oracles import jpeg_size, to_model_space


@pytest.mark.parametrize("quality", [50, 75, 95])
def test_quantisation_table_is_the_one_pillow_writes(quality):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buf, format="JPEG", quality=quality)
    written = Image.open(io.BytesIO(buf.getvalue())).quantization[0]
    assert quantisation_table(quality).flatten().tolist() == list(written)


def test_coefficients_are_the_padded_block_dct_in_quantisation_steps():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 12, 10), dtype=np.uint8)  # pads to 16 x 16: 4 blocks
    net = JpegSizeNet(95, [1.0])
    got = net.coefficients(to_model_space(pixels)).double()
    padded = np.pad(pixels.astype(float), ((0, 0), (0, 4), (0, 6)), mode="edge") - 128
    table = quantisation_table(95).double().numpy()
    for n in range(2):
        for b, (i, j) in enumerate([(0, 0), (0, 8), (8, 0), (8, 8)]):
            want = dctn(padded[n, i : i + 8, j : j + 8], norm="ortho") / table
            np.testing.assert_allclose(got[n, b].numpy(), want.ravel(), atol=1e-3)


def test_ordinal_log_probs_are_a_distribution_ordered_like_bin_scores():
    thresholds = [700.0, 750.0, 800.0]  # classes: 0 >= 800 > 1 >= 750 > 2 >= 700 > 3
    sizes = torch.tensor([900.0, 775.0, 725.0, 600.0, 2000.0, -500.0])
    log_p = ordinal_log_probs(sizes, torch.tensor(thresholds), torch.tensor(3.0))
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(6))
    assert log_p.argmax(1).tolist() == bin_scores(sizes.numpy(), thresholds).tolist()
    # Logistic tails: far from its class the log-probability falls linearly, not quadratically.
    far = ordinal_log_probs(torch.tensor([900.0, 1000.0]), torch.tensor(thresholds), torch.tensor(3.0))
    assert (far[0, 3] - far[1, 3]).item() == pytest.approx(100 / 3, rel=1e-3)


def hazy_blobs(n: int, seed: int) -> np.ndarray:
    """Bright squares on black with faint noise of varying strength: JPEG sizes spread widely."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28))
    for k in range(n):
        i, j, s = rng.integers(2, 14), rng.integers(2, 14), rng.integers(4, 13)
        images[k, i : i + s, j : j + s] = 255
        images[k] += rng.uniform(0, 12) * rng.standard_normal((28, 28))
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def test_fit_learns_jpeg_classes_of_unseen_images():
    sizes = np.array([jpeg_size(p) for p in hazy_blobs(900, 0)])
    thresholds = quantile_thresholds(sizes[:600], 3)
    labels = torch.from_numpy(bin_scores(sizes, thresholds)).long()
    x = to_model_space(hazy_blobs(900, 0))
    net = fit_jpeg_size(x[:600], labels[:600], 95, thresholds)
    with torch.no_grad():
        accuracy = (net(x[600:]).argmax(1) == labels[600:]).float().mean().item()
        error = net.size(x[600:]).numpy() - sizes[600:]
    assert accuracy > 0.85  # three classes of equal share: chance is 1/3
    assert np.abs(error).mean() < 0.05 * (sizes.max() - sizes.min())


def test_saved_size_classifier_loads_and_its_log_prob_has_input_gradients(tmp_path):
    net = JpegSizeNet(95, [700.0, 750.0])
    with torch.no_grad():
        net.weight.uniform_(0.5, 2.0)
        net.bias.fill_(300.0)
    arch = {"kind": "jpeg_size", "quality": 95, "thresholds": [700.0, 750.0]}
    Classifier(net, arch, temperature=1.3, meta={"classes": [0, 1, 2]}).save(tmp_path / "c")
    loaded = Classifier.load(tmp_path / "c")
    assert isinstance(loaded.net, JpegSizeNet)
    x = to_model_space(hazy_blobs(3, 1)).requires_grad_(True)
    log_p = loaded.log_prob(x, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(log_p, Classifier(net, arch, 1.3).log_prob(x, torch.tensor([0, 1, 2])))
    log_p.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
