import pytest
import torch

from ctrldiff.control import (
    ATTENTION_PROJECTIONS,
    RESNET_CONVS,
    ControlledStep,
    YEmbedding,
    add_control,
    load_control,
    uncontrolled_from,
)
from ctrldiff.ctrl import RolloutConfig, rollout
from ctrldiff.ddim import timestep_pairs
from ctrldiff.sampling import SamplerConfig, ddim_cfg_step, guided_eps, request_noise, sample
from tests.conftest import micro_base


def perturb_lora(base) -> None:
    """Random LoRA weights, so that the adapted model differs from the base."""
    with torch.no_grad():
        for name, p in base.unet.named_parameters():
            if "lora_" in name:
                p.normal_()


@pytest.mark.parametrize("targets", [None, ATTENTION_PROJECTIONS + RESNET_CONVS])
def test_augmented_model_equals_the_base_at_initialisation(targets):
    base, ref = micro_base(), micro_base()
    model = add_control(base, y_classes=[0, 1, 2, 3], lora_rank=4, lora_targets=targets)
    lora_names = [n for n, _ in base.unet.named_parameters() if "lora_" in n]
    adapted = {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n in lora_names}
    assert ("conv1" in adapted) == (targets is not None) and "to_q" in adapted
    x, c, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(
            guided_eps(base, x, 500, c, 2.0, y, model.y_null), guided_eps(ref, x, 500, c, 2.0)
        )
    lora, emb = model.trainable_parameters()
    assert lora and emb and all(p.requires_grad for p in lora + emb)
    assert not any(
        p.requires_grad for n, p in base.unet.named_parameters() if "lora_" not in n and "class_emb" not in n
    )


def test_null_row_stays_zero_and_gets_no_gradient():
    emb = YEmbedding(3, 5)
    with torch.no_grad():
        emb.weight.normal_()
    emb(torch.tensor([0, 3, 3, 1])).sum().backward()
    assert torch.equal(emb(torch.tensor([3])), torch.zeros(1, 5))
    assert torch.equal(emb.weight.grad[3], torch.zeros(5))
    # convex weights interpolate the class rows
    w = torch.tensor([[0.25, 0.75, 0.0]])
    torch.testing.assert_close(emb(w), 0.25 * emb.weight[0:1] + 0.75 * emb.weight[1:2])


def test_reference_context_disables_the_adapters():
    base, ref = micro_base(), micro_base()
    model = add_control(base, [0, 1], lora_rank=2)
    perturb_lora(base)
    x, c, y_null = torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), torch.tensor([2, 2])
    with torch.no_grad():
        changed = guided_eps(base, x, 300, c, 1.0, y_null)
        with model.reference():
            frozen = guided_eps(base, x, 300, c, 1.0, y_null)
    torch.testing.assert_close(frozen, guided_eps(ref, x, 300, c, 1.0))
    assert not torch.allclose(changed, frozen)


def test_saved_adapter_reloads_to_identical_samples(tmp_path):
    base = micro_base()
    model = add_control(base, [0, 1, 2], lora_rank=2, lora_targets=ATTENTION_PROJECTIONS + RESNET_CONVS)
    with torch.no_grad():
        for p in [*model.trainable_parameters()[0], *model.trainable_parameters()[1]]:
            p.normal_(std=0.1)
    model.save(tmp_path / "ctrl")
    loaded = load_control(micro_base(), tmp_path / "ctrl")
    cfg = SamplerConfig(steps=3)
    c, y = torch.tensor([0, 1]), torch.tensor([2, 1])
    a = sample(model.base, c, [1, 2], cfg, y, model.y_null)
    b = sample(loaded.base, c, [1, 2], cfg, y, loaded.y_null)
    torch.testing.assert_close(a, b)


def test_unknown_y_is_refused_naming_the_value():
    model = add_control(micro_base(), [0, 1, 2, 3], lora_rank=2)
    with pytest.raises(ValueError, match="y = 9"):
        sample(
            model.base,
            torch.tensor([0, 1]),
            [0, 1],
            SamplerConfig(steps=2),
            torch.tensor([1, 9]),
            model.y_null,
        )


def test_a_saved_adapter_has_the_same_bytes_in_every_process(tmp_path):
    """The same tensors saved by two processes with other hash seeds: peft's set of target modules and
    safetensors' metadata map used to come out in a per-process order."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (
        "import sys, torch; from tests.conftest import micro_base; from ctrldiff.control import add_control\n"
        "torch.manual_seed(0)\n"
        "m = add_control(micro_base(), [0, 1, 2, 3], 2,"
        " ['to_q', 'to_k', 'to_v', 'to_out.0', 'conv1', 'conv2'])\n"
        "m.save(sys.argv[1])\n"
    )
    for seed in ("1", "2"):
        env = os.environ | {"PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / seed)], env=env, check=True, cwd=root)
    files = sorted(p.relative_to(tmp_path / "1") for p in (tmp_path / "1").rglob("*") if p.is_file())
    assert len(files) >= 3  # the LoRA weights, the y-embedding, control.json
    for f in files:
        assert (tmp_path / "1" / f).read_bytes() == (tmp_path / "2" / f).read_bytes(), f
    loaded = load_control(micro_base(), tmp_path / "1")  # still loads through diffusers
    assert loaded.lora_rank == 2


def test_the_controlled_step_takes_the_bases_step_where_the_chain_is_deterministic():
    base, ref = micro_base(), micro_base()
    model = add_control(base, [0, 1], lora_rank=2)
    perturb_lora(base)
    cfg = SamplerConfig(steps=4, eta=1.0, guidance_scale=2.0)
    x, z, c, y = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), torch.tensor([1, 0])
    step = ControlledStep(model)
    *stochastic, last = timestep_pairs(base.scheduler, cfg.steps)
    with torch.no_grad():
        # the last step (into t = -1, sigma = 0): the frozen base's, whatever the adapter
        torch.testing.assert_close(
            step(base, x, *last, z, c, cfg, y, model.y_null), ddim_cfg_step(ref, x, *last, z, c, cfg)
        )
        t, t_prev = stochastic[0]
        controlled = step(base, x, t, t_prev, z, c, cfg, y, model.y_null)
        torch.testing.assert_close(controlled, ddim_cfg_step(base, x, t, t_prev, z, c, cfg, y, model.y_null))
        assert not torch.allclose(controlled, ddim_cfg_step(ref, x, t, t_prev, z, c, cfg))


def test_training_rollouts_and_sampling_draw_the_same_image_for_a_seed():
    base = micro_base()
    model = add_control(base, [0, 1], lora_rank=2)
    perturb_lora(base)
    seeds, c, y = [5, 6], torch.tensor([0, 1]), torch.tensor([1, 0])
    ro = RolloutConfig(steps=4, eta=1.0, guidance_scale=2.0, grad_steps=2)
    with torch.no_grad():
        x0, _, _ = rollout(model, c, y, request_noise(seeds, base.sample_shape, ro.steps), ro)
        sampled = sample(base, c, seeds, SamplerConfig(4, 1.0, 2.0), y, model.y_null, ControlledStep(model))
    torch.testing.assert_close(x0.clamp(-1, 1), sampled)


def test_a_step_left_to_the_base_is_the_bases_in_sampling_and_rollouts_and_costs_no_kl(tmp_path):
    base, ref = micro_base(), micro_base()
    last = uncontrolled_from(base.scheduler, 4, 1.0, 1)
    pairs = timestep_pairs(base.scheduler, 4)
    assert last == pairs[-2][0]  # the last stochastic step (the one into t = -1 is deterministic)
    model = add_control(base, [0, 1], lora_rank=2, uncontrolled_t=last)
    perturb_lora(base)
    cfg = SamplerConfig(steps=4, eta=1.0, guidance_scale=2.0)
    x, z, c, y = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), torch.tensor([1, 0])
    step = ControlledStep(model)
    with torch.no_grad():
        torch.testing.assert_close(
            step(base, x, *pairs[-2], z, c, cfg, y, model.y_null),
            ddim_cfg_step(ref, x, *pairs[-2], z, c, cfg),
        )
        assert not torch.allclose(
            step(base, x, *pairs[-3], z, c, cfg, y, model.y_null),
            ddim_cfg_step(ref, x, *pairs[-3], z, c, cfg),
        )
        ro = RolloutConfig(steps=4, eta=1.0, guidance_scale=2.0, grad_steps=2)
        seeds = [5, 6]
        x0, _, kl_steps = rollout(model, c, y, request_noise(seeds, base.sample_shape, 4), ro)
        sampled = sample(base, c, seeds, cfg, y, model.y_null, step)
    torch.testing.assert_close(x0.clamp(-1, 1), sampled)
    assert kl_steps.shape == (2, 3) and (kl_steps[:, -1] == 0).all() and (kl_steps[:, :-1] > 0).all()
    model.save(tmp_path)
    assert load_control(micro_base(), tmp_path).uncontrolled_t == last


def test_leaving_more_steps_than_the_chain_has_is_refused_naming_the_parameter():
    with pytest.raises(ValueError, match="finetune.base_last_steps = 4: the 4-step chain has only 3"):
        uncontrolled_from(micro_base().scheduler, 4, 1.0, 4)
    assert uncontrolled_from(micro_base().scheduler, 4, 1.0, 0) is None
