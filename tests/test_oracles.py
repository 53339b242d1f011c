import numpy as np
import torch

from ctrldiff.oracles import ink_coverage, jpeg_size, to_model_space, to_uint8


def test_flat_image_is_more_compressible_than_noise():
    rng = np.random.default_rng(0)
    flat = np.full((28, 28), 90, dtype=np.uint8)
    noisy = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    assert jpeg_size(flat) < jpeg_size(noisy)
    assert jpeg_size(noisy, quality=50) < jpeg_size(noisy, quality=95)


def test_ink_coverage_counts_bright_pixels():
    img = np.zeros((10, 10), dtype=np.uint8)
    img[:3] = 255
    assert ink_coverage(img) == 0.3


def test_uint8_round_trip_is_exact():
    pixels = np.random.default_rng(1).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    x = to_model_space(pixels)
    assert x.shape == (4, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_uint8(x), pixels)
    rgb = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(to_model_space(rgb)), rgb)
    assert to_uint8(torch.full((1, 1, 2, 2), 5.0)).max() == 255  # out-of-range values are clamped
