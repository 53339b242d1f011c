import pytest
import torch

from ctrldiff.base import BaseModelError, build_embedded, load_base, train_base
from ctrldiff.sampling import SamplerConfig, sample
from tests.conftest import MICRO, micro_base

CFG = SamplerConfig(steps=4, eta=1.0, guidance_scale=2.0)


def test_training_updates_unet_and_class_encoder(base):
    before = [p.detach().clone() for p in (*base.unet.parameters(), *base.encoder.parameters())]
    x, c = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (16,))
    losses = train_base(base, x, c, MICRO, seed=0)
    assert len(losses) == MICRO.train_steps and all(torch.isfinite(torch.tensor(losses)))
    after = [*base.unet.parameters(), *base.encoder.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not base.unet.training


def test_save_load_round_trip_gives_identical_samples(base, tmp_path):
    base.save(tmp_path / "base")
    loaded = load_base(tmp_path / "base")
    c = torch.tensor([0, 1, 2])
    torch.testing.assert_close(sample(loaded, c, [1, 2, 3], CFG), sample(base, c, [1, 2, 3], CFG))
    assert loaded.meta == base.meta


def test_missing_and_corrupt_checkpoints_fail_clearly(base, tmp_path):
    with pytest.raises(BaseModelError, match="run the `base` stage"):
        load_base(tmp_path / "nothing")
    base.save(tmp_path / "base")
    (tmp_path / "base/unet/diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(BaseModelError, match="cannot load the base model"):
        load_base(tmp_path / "base")


def test_unknown_class_is_refused_naming_the_value():
    base = micro_base(num_classes=3)
    with pytest.raises(BaseModelError, match="c = 7"):
        sample(base, torch.tensor([0, 7]), [0, 1], CFG)


def test_to_moves_denoiser_and_encoder(base):
    """`BaseModel.to` is how sampling stages reach the GPU; the sampler then follows the UNet."""
    base.to("meta")
    assert base.device.type == "meta"
    assert all(p.device.type == "meta" for p in base.encoder.parameters())


def test_a_v_prediction_base_trains_and_keeps_its_parameterisation(tmp_path):
    cfg = MICRO.model_copy(update={"prediction_type": "v_prediction"})
    base = build_embedded(cfg, num_classes=3, resolution=8, channels=1)
    losses = train_base(base, torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (16,)), cfg, seed=0)
    assert all(torch.isfinite(torch.tensor(losses)))
    base.save(tmp_path / "base")
    loaded = load_base(tmp_path / "base")
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    c = torch.tensor([0, 1])
    torch.testing.assert_close(sample(loaded, c, [4, 5], CFG), sample(base, c, [4, 5], CFG))


def test_the_same_params_and_seed_train_the_same_bytes_whatever_ran_before(tmp_path):
    """`dvc repro -f` retrained `base` to other bytes: the UNet's initial weights came from the global
    RNG, unseeded. Now they come from the seed alone."""
    data = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    c = torch.arange(16) % 3
    for run, warm_up in enumerate((0, 7)):
        torch.rand(warm_up)  # other work before the stage: the global RNG is elsewhere
        base = build_embedded(MICRO, num_classes=3, resolution=8, channels=1, seed=4)
        train_base(base, data, c, MICRO, seed=0)
        base.save(tmp_path / f"run{run}")
    files = sorted(p.relative_to(tmp_path / "run0") for p in (tmp_path / "run0").rglob("*") if p.is_file())
    assert files
    for f in files:
        assert (tmp_path / "run0" / f).read_bytes() == (tmp_path / "run1" / f).read_bytes(), f
    other = build_embedded(MICRO, num_classes=3, resolution=8, channels=1, seed=5)
    assert not torch.equal(next(other.unet.parameters()), next(base.unet.parameters()))
