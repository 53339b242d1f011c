"""The one-off diagnostics in research/: each computes what its docstring says, on micro models."""

import torch

from ctrldiff.control import add_control
from ctrldiff.ctrl import RolloutConfig, rollout
from ctrldiff.ddim import timestep_pairs
from ctrldiff.sampling import SamplerConfig, guided_eps, request_noise, sample
from research.control_window import windowed_sample
from research.gradient_coherence import continuation_gradients, signal_fraction
from research.kl_per_step import kl_per_step
from research.mc_value import ValueGradientStep, ValueResampleStep, ValueShiftStep, lowpass
from research.policy_gradient import policy_gradient_loss
from tests.conftest import micro_base, micro_reward
from tests.test_solvers import STEPS, GaussianReward, ToyControl, assert_reaches_the_tilt, draw


def test_kl_per_step_matches_the_step_by_step_kl_of_the_control_window():
    model = add_control(micro_base(), [0, 1], lora_rank=2)
    with torch.no_grad():
        model.y_embedding.weight[0].normal_()  # a control that moves the means
    cfg = RolloutConfig(steps=4, grad_steps=4)
    c, seeds = torch.tensor([0, 1, 2]), [5, 6, 7]
    steps, pixels = kl_per_step(model, c, 0, seeds, cfg)
    assert len(steps) == cfg.steps - 1  # the last step is deterministic: no KL
    assert min(steps) > 0
    # the same trajectories through the sampler's step-by-step path, control on every step
    _, kl = windowed_sample(model, c, torch.zeros_like(c), seeds, SamplerConfig(steps=4), first=cfg.steps)
    torch.testing.assert_close(torch.tensor(steps), torch.tensor(kl.mean(0)), rtol=1e-5, atol=1e-6)
    assert pixels.shape[0] == 3 and pixels.dtype.name == "uint8"


def test_control_window_is_the_base_at_zero_steps_and_the_fine_tuned_model_at_all():
    base = micro_base()
    c, y, seeds = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1]), [5, 6, 7]
    cfg = SamplerConfig(steps=4)
    before = sample(base, c, seeds, cfg)  # the base model, no control attached yet
    model = add_control(base, [0, 1], lora_rank=2)
    with torch.no_grad():
        model.y_embedding.weight[:2].normal_()  # a control that moves the means
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    images, kl = windowed_sample(model, c, y, seeds, cfg, first=0)
    torch.testing.assert_close(images, before)
    assert kl.shape == (3, cfg.steps - 1) and (kl == 0).all()
    images, kl = windowed_sample(model, c, y, seeds, cfg, first=cfg.steps)
    torch.testing.assert_close(images, sample(base, c, seeds, cfg, y, model.y_null))
    noise = request_noise(seeds, base.sample_shape, cfg.steps)
    with torch.no_grad():
        _, _, kl_steps = rollout(model, c, y, noise, RolloutConfig(steps=4, grad_steps=4))
    torch.testing.assert_close(torch.tensor(kl), kl_steps, rtol=1e-5, atol=1e-6)
    _, kl = windowed_sample(model, c, y, seeds, cfg, first=2)
    assert (kl[:, :2] > 0).all() and (kl[:, 2:] == 0).all()


def test_signal_fraction_recovers_the_share_of_a_common_direction():
    gen = torch.Generator().manual_seed(0)
    m, n, d = 8, 40, 4000
    mean = torch.randn(1, n, d, generator=gen)
    noise = torch.randn(m, n, d, generator=gen)
    assert (signal_fraction(mean.expand(m, n, d)) - 1).abs().max() < 1e-5
    assert signal_fraction(noise).mean().abs() < 0.02
    share = 0.25  # ||E g||^2 / E||g||^2 = 1 / (1 + 3): noise with 3 times the mean's energy
    g = mean + 3**0.5 * noise
    assert abs(signal_fraction(g).mean().item() - share) < 0.02
    g[:, 0] = 0  # a state the reward is flat at: no gradient to split
    assert signal_fraction(g)[0].isnan() and not signal_fraction(g)[1:].isnan().any()


def test_continuation_gradients_agree_at_the_deterministic_last_step_and_not_from_x_T():
    base = micro_base()
    base.unet.requires_grad_(False)
    reward = micro_reward(num_classes=2).requires_grad_(False)
    c, y = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1])
    cfg = SamplerConfig(steps=4)
    out = continuation_gradients(base, reward, c, y, [5, 6, 7], cfg, m=4, seed=0)
    assert [t for t, _, _ in out] == [t for t, _ in timestep_pairs(base.scheduler, 4)]
    torch.testing.assert_close(out[-1][1], torch.ones(3))  # no noise after t = 0: all continuations agree
    assert (out[0][1] < 0.5).all()  # from x_T, three noisy steps decide most of the gradient
    assert all(norm > 0 for _, _, norm in out)


def test_mc_value_gradient_is_the_derivative_of_the_log_of_its_monte_carlo_value():
    base, reward = micro_base(), micro_reward(num_classes=2)
    cfg = SamplerConfig(steps=4)
    c, y, seeds = torch.tensor([0, 1]), torch.tensor([1, 0]), [5, 6]
    x = torch.randn(2, *base.sample_shape, generator=torch.Generator().manual_seed(1))
    t_prev = timestep_pairs(base.scheduler, cfg.steps)[1][0]
    grad = ValueGradientStep(reward, gamma=3.0, continuations=4, min_t=-1).grad_log_h(
        base, x, t_prev, c, y, cfg, seeds
    )
    value = ValueResampleStep(reward, gamma=3.0, continuations=4, candidates=2, min_t=-1)
    v = torch.randn_like(x)  # the same continuations' noise: seeded by (request, t_prev) in both
    eps = 1e-3
    diff = (
        value.log_h(base, x + eps * v, t_prev, c, y, cfg, seeds)
        - value.log_h(base, x - eps * v, t_prev, c, y, cfg, seeds)
    ) / (2 * eps)
    torch.testing.assert_close((grad * v).flatten(1).sum(1), diff, rtol=2e-2, atol=2e-3)


def test_mc_value_resampling_with_one_candidate_is_the_base_sampler_and_costs_no_kl():
    base, reward = micro_base(), micro_reward(num_classes=2)
    cfg = SamplerConfig(steps=4)
    c, y, seeds = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1]), [5, 6, 7]
    step = ValueResampleStep(reward, gamma=3.0, continuations=2, candidates=1, min_t=-1)
    torch.testing.assert_close(sample(base, c, seeds, cfg, y, 2, step), sample(base, c, seeds, cfg))
    assert len(step.kl) == cfg.steps - 1 and all((k.abs() < 1e-6).all() for k in step.kl)
    step = ValueResampleStep(reward, gamma=3.0, continuations=2, candidates=4, min_t=-1)
    sample(base, c, seeds, cfg, y, 2, step)
    kl = torch.stack(step.kl)
    assert (kl > 0).any() and (kl <= torch.log(torch.tensor(4.0)) + 1e-5).all()  # at most log K per step


def test_mc_value_max_t_keeps_the_base_kernel_above_the_window():
    base, reward = micro_base(), micro_reward(num_classes=2)
    cfg = SamplerConfig(steps=4)
    c, y, seeds = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1]), [5, 6, 7]
    stochastic = [t for t, tp in timestep_pairs(base.scheduler, cfg.steps) if tp >= 0]
    step = ValueResampleStep(reward, gamma=3.0, continuations=2, candidates=4, min_t=-1)
    step.max_t = min(stochastic) - 1  # every step above the window: the base sampler, no KL collected
    torch.testing.assert_close(sample(base, c, seeds, cfg, y, 2, step), sample(base, c, seeds, cfg))
    assert step.kl == []
    step.kl, step.max_t = [], min(stochastic)  # only the last stochastic step chooses
    images = sample(base, c, seeds, cfg, y, 2, step)
    assert len(step.kl) == 1 and (step.kl[0] > 0).any()
    assert not torch.allclose(images, sample(base, c, seeds, cfg))


def test_mc_value_shift_is_the_candidates_weighted_noise_low_passed_and_its_kl():
    from ctrldiff.ddim import ddim_step

    base, reward = micro_base(), micro_reward(num_classes=2)
    cfg = SamplerConfig(steps=4)
    c, y, seeds = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1]), [5, 6, 7]
    (t, t_prev), k = timestep_pairs(base.scheduler, cfg.steps)[1], 6
    x = torch.randn(3, *base.sample_shape, generator=torch.Generator().manual_seed(1))
    z = torch.randn(3, *base.sample_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mean, sigma, _ = ddim_step(
            base.scheduler, x, guided_eps(base, x, t, c, cfg.guidance_scale), t, t_prev, 1.0
        )
    gens = [torch.Generator().manual_seed(s * 1_000_003 + t) for s in seeds]
    noises = torch.stack([torch.randn((k, *z.shape[1:]), generator=g) for g in gens], 1)  # the step's own
    for gamma, keep in ((0.0, 2), (0.0, 8), (5.0, 2)):
        step = ValueShiftStep(reward, gamma, continuations=2, candidates=k, min_t=-1, keep=keep)
        shift = step(base, x, t, t_prev, z, c, cfg, y, seeds=seeds) - (mean + sigma * z)
        torch.testing.assert_close(lowpass(shift, keep), shift, atol=1e-5, rtol=0)  # in the kept band only
        torch.testing.assert_close(step.kl[0], shift.pow(2).flatten(1).sum(1) / (2 * sigma**2))
        if gamma == 0:  # uniform weights: the plain mean of the candidates' noises
            torch.testing.assert_close(shift, sigma * lowpass(noises.mean(0), keep), atol=1e-5, rtol=1e-4)
        else:
            assert (shift - sigma * lowpass(noises.mean(0), keep)).abs().max() > 1e-4  # ĥ moves the weights
    for keep in (2, 8):  # --pick: one candidate's noise in the band, the step's own above it
        step = ValueShiftStep(reward, 5.0, continuations=2, candidates=k, min_t=-1, keep=keep, pick=True)
        u = (step(base, x, t, t_prev, z, c, cfg, y, seeds=seeds) - mean) / sigma
        low = lowpass(u, keep)
        torch.testing.assert_close(u - low, z - lowpass(z, keep), atol=1e-4, rtol=0)
        gaps = (lowpass(noises, keep) - low).flatten(2).abs().amax(2)  # (K, n): 0 for the chosen one
        assert (gaps.amin(0) < 1e-4).all()
        assert (step.kl[0] >= -1e-6).all() and (step.kl[0] <= torch.log(torch.tensor(float(k))) + 1e-5).all()


def test_policy_gradient_reaches_the_tilt_of_the_gaussian_known_answer_case():
    """The score-function estimator, which never takes the reward's gradient, has the solvers' optimum."""
    model, updates, group = ToyControl(), 300, 4
    opt = torch.optim.Adam([model.base.unet.a, model.base.unet.b], lr=0.02)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1 - u / updates)
    for u in range(updates):
        c, _, seeds = draw(0, 128, 10_000 + u)
        y = (torch.arange(128) // group) % 2  # blocks of `group` rollouts share a request
        loss, _ = policy_gradient_loss(
            model, GaussianReward(), 1.0, c, y, seeds, RolloutConfig(STEPS, 1.0, 1.0), group
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    assert_reaches_the_tilt(model)


def test_band_limited_control_moves_the_mean_only_in_the_lowest_frequencies():
    from research.choice_distill import lowpass
    from research.lowpass_control import band_limited

    base = micro_base()
    model = add_control(base, [0, 1], lora_rank=2)
    with torch.no_grad():
        model.y_embedding.weight[:2].normal_()
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    x, c, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1])
    null = torch.full_like(y, model.y_null)
    with torch.no_grad():
        free = guided_eps(base, x, 500, c, 2.0, y, model.y_null)
        with model.reference():
            ref = guided_eps(base, x, 500, c, 2.0, null, model.y_null)
        limited = band_limited(guided_eps, model, 2)(base, x, 500, c, 2.0, y, model.y_null)
        whole = band_limited(guided_eps, model, 8)(base, x, 500, c, 2.0, y, model.y_null)
    shift = limited - ref
    assert shift.abs().max() > 1e-3  # the control still moves the mean ...
    torch.testing.assert_close(lowpass(shift, 2), shift, atol=1e-6, rtol=0)  # ... in the 2 x 2 band alone
    torch.testing.assert_close(shift, lowpass(free - ref, 2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(whole, free)  # N = the image's size: the unrestricted control
    torch.testing.assert_close(lowpass(free, 8), free, atol=1e-5, rtol=1e-5)  # the basis is orthonormal


def test_feedback_control_starts_at_the_plain_control_and_leaves_the_null_branch_alone():
    from research.lowpass_control import FeedbackEmbedding, with_feedback

    base = micro_base()
    model = add_control(base, [0, 1], lora_rank=2)
    emb = model.y_embedding
    base.unet.class_embedding = FeedbackEmbedding(emb.num_classes, emb.weight.shape[1], 4)
    with torch.no_grad():
        model.y_embedding.weight[:2].normal_()
    reward = micro_reward(num_classes=4, in_channels=1)
    x, c, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1])
    null = torch.full_like(y, model.y_null)
    step = with_feedback(guided_eps, model, reward)
    with torch.no_grad():
        plain = guided_eps(base, x, 500, c, 2.0, y, model.y_null)
        torch.testing.assert_close(step(base, x, 500, c, 2.0, y, model.y_null), plain)  # zero-initialised
        model.y_embedding.feedback.weight.normal_()
        read = step(base, x, 500, c, 2.0, y, model.y_null)
        assert (read - plain).abs().max() > 1e-4  # the control now depends on the reward's reading
        assert model.y_embedding.context is None  # the reading is of one call only
        unconditional = guided_eps(base, x, 500, c, 2.0, null, model.y_null)
        torch.testing.assert_close(step(base, x, 500, c, 2.0, null, model.y_null), unconditional)
        model.y_embedding.context = torch.ones(3, 4)  # the guided call's NULL half gets no reading
        rows = model.y_embedding(torch.cat([y, null]))
        model.y_embedding.context = None
        assert rows[:3].abs().max() > 0 and (rows[3:] == 0).all()


def test_chosen_noise_is_recovered_from_the_next_recorded_state():
    from research.choice_distill import chosen_noise

    gen = torch.Generator().manual_seed(0)
    steps, n, shape = [(900, 600), (600, 300), (300, 0)], 3, (1, 4, 4)
    rows = {key: [] for key in ["x", "t", "t_prev", "mean", "sigma", "traj"]}
    kept = {}
    for r in range(n):
        x = torch.randn(shape, generator=gen)
        for t, tp in steps:
            mean, sigma = 0.9 * x + 0.1, 0.5 + t / 1000
            z = torch.randn(shape, generator=gen)
            for key, v in zip(rows, [x, t, tp, mean, sigma, r], strict=True):
                rows[key].append(torch.as_tensor(v))
            kept[(r, t)] = z
            x = mean + sigma * z
    data = {key: torch.stack(v) for key, v in rows.items()}
    z, which = chosen_noise(data)
    assert len(which) == n * (len(steps) - 1)  # the last recorded step has no next state
    for zi, i in zip(z, which.tolist(), strict=True):
        torch.testing.assert_close(zi, kept[(int(data["traj"][i]), int(data["t"][i]))])


def test_target_noise_estimators_at_zero_gamma_are_the_plain_mean_and_antithetic_pairs_cancel():
    from research.target_noise import ESTIMATORS, candidate_noises, target

    base, reward = micro_base(), micro_reward(num_classes=2)
    cfg = SamplerConfig(steps=4)
    t_prev, k = timestep_pairs(base.scheduler, cfg.steps)[1][1], 6
    x = torch.randn(3, *base.sample_shape, generator=torch.Generator().manual_seed(1))
    row = {"x": x, "mean": 0.9 * x, "sigma": torch.full((3,), 0.5), "c": torch.tensor([0, 1, 2])}
    row |= {"y": torch.tensor([1, 0, 1]), "t_prev": t_prev, "seed": [5, 6, 7]}
    replicate_0 = [s * 1_009 for s in row["seed"]]  # the seeds `target` draws replicate 0's noises from
    z = candidate_noises(k, tuple(base.sample_shape), replicate_0, antithetic=True)
    torch.testing.assert_close(z[: k // 2], -z[k // 2 :])
    flat = ValueResampleStep(reward, gamma=0.0, continuations=1, candidates=k, min_t=-1)
    for est in ESTIMATORS:
        u, ess = target(flat, base, row, est, 0, cfg)
        torch.testing.assert_close(ess, torch.full((3,), float(k)))  # uniform weights
        z = candidate_noises(k, tuple(base.sample_shape), replicate_0, est == "antithetic")
        torch.testing.assert_close(u, z.mean(0), atol=1e-6, rtol=1e-5)
    sharp = ValueResampleStep(reward, gamma=5.0, continuations=1, candidates=k, min_t=-1)
    u_ind, _ = target(sharp, base, row, "independent", 0, cfg)
    u_com, _ = target(sharp, base, row, "common", 0, cfg)
    assert not torch.allclose(u_ind, u_com)  # the continuations' noise moves the weights
