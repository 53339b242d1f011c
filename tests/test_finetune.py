import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.optimization import get_constant_schedule_with_warmup
from safetensors.torch import load_file

import ctrldiff.finetune as ft
from ctrldiff.control import add_control
from ctrldiff.finetune import draw_batch, finetune
from ctrldiff.io import read_json
from ctrldiff.sampling import SamplerConfig
from ctrldiff.tilt import base_trajectories
from tests.conftest import LABEL_META, free_port, micro_base, micro_finetune, micro_reward

ROOT = Path(__file__).resolve().parents[1]


def micro_trajectories(cfg, seed: int = 0, n: int = 12):
    """The micro base's own trajectories, n over its 3 classes c, with the rollout sampler of ``cfg``."""
    ro = cfg.rollout
    seeds = list(range(seed, seed + n))
    sampler = SamplerConfig(ro.steps, ro.eta, ro.guidance_scale)
    return base_trajectories(micro_base(), torch.arange(n) % 3, seeds, sampler, n)


def run(updates: int, ckpt: Path, gamma: float = 10.0, reward=None, trajectories_seed: int = 0, **kw):
    model = add_control(micro_base(), [0, 1, 2, 3], lora_rank=2)
    torch.manual_seed(0)
    if kw.get("solver") == "weighted":
        kw.setdefault("min_ess", 1.0)
    cfg = micro_finetune(updates=updates, checkpoint_every=1, probe_every=2, probe_per_class=1, **kw)
    traj = micro_trajectories(cfg, trajectories_seed) if cfg.solver == "weighted" else None
    result = finetune(model, reward or micro_reward(), gamma, cfg, LABEL_META, 0, ckpt, trajectories=traj)
    return model, result


def trainable(model):
    return {n: p.detach().clone() for n, p in model.base.unet.named_parameters() if p.requires_grad}


def test_updates_move_the_parameters_keep_null_zero_and_log(tmp_path):
    model, result = run(2, tmp_path / "ckpt")
    emb = model.y_embedding.weight
    assert emb[:4].abs().sum() > 0 and torch.equal(emb[4], torch.zeros_like(emb[4]))
    assert [h["update"] for h in result["history"]] == [1, 2]
    assert {"reward", "kl", "loss", "probe/jpeg_bytes_y0", "probe/oracle_accuracy"} <= set(
        result["history"][1]
    )
    assert result["history"][1]["reward_queries"] == 4


def kill_after(monkeypatch, update: int) -> None:
    """Interrupt the next run right after its checkpoint of `update` is written."""
    save = ft.save_checkpoint

    def save_then_die(directory, model, opt, done, *args):
        save(directory, model, opt, done, *args)
        if done == update:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_checkpoint", save_then_die)


@pytest.mark.parametrize(  # the rate schedule is rebuilt at the resumed update, mid-warm-up or mid-decay
    "schedule",
    [
        {},
        {"warmup_updates": 4},
        {"warmup_updates": 1, "decay_updates": 2},
        {"solver": "weighted"},
        {"solver": "adjoint"},
    ],
)
def test_resume_continues_from_the_saved_update_and_matches_an_uninterrupted_run(
    tmp_path, monkeypatch, schedule
):
    full, uninterrupted = run(3, tmp_path / "full", **schedule)
    with monkeypatch.context() as m:
        kill_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run(3, tmp_path / "ckpt", **schedule)
    assert read_json(tmp_path / "ckpt/state.json")["update"] == 2
    resumed, result = run(3, tmp_path / "ckpt", **schedule)
    assert result["start_update"] == 2 and [h["update"] for h in result["history"]] == [1, 2, 3]
    assert result["history"][:2] == uninterrupted["history"][:2]  # the log before the interruption is kept
    assert [h["lr_lora"] for h in result["history"]] == [h["lr_lora"] for h in uninterrupted["history"]]
    for name, p in trainable(full).items():
        torch.testing.assert_close(trainable(resumed)[name], p)


def rates(result) -> list[float]:
    """The LoRA rate of each update, as a fraction of finetune.lr_lora."""
    return [h["lr_lora"] / micro_finetune().lr_lora for h in result["history"]]


def test_the_rate_warms_up_holds_then_decays_linearly_towards_zero(tmp_path):
    _, result = run(5, tmp_path / "ckpt", warmup_updates=2, decay_updates=2)
    assert rates(result) == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.5])


def test_without_decay_the_rates_are_diffusers_constant_schedule_with_warmup(tmp_path):
    """The default schedule is unchanged from the one the committed pipeline results were trained with."""
    _, result = run(6, tmp_path / "ckpt", warmup_updates=4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_constant_schedule_with_warmup(opt, 4)
    assert rates(result) == pytest.approx([reference.lr_lambdas[0](u) for u in range(6)])


def test_a_cool_down_appended_to_a_finished_run_resumes_it(tmp_path):
    run(3, tmp_path / "ckpt")  # a finished run at a constant rate
    appended, result = run(5, tmp_path / "ckpt", decay_updates=2)
    assert result["start_update"] == 3
    assert rates(result) == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.5])
    planned, _ = run(5, tmp_path / "planned", decay_updates=2)  # the same schedule from the start
    for name, p in trainable(planned).items():
        torch.testing.assert_close(trainable(appended)[name], p)


def test_accumulated_micro_batches_give_the_gradient_of_one_batch_of_the_same_trajectories(
    tmp_path, monkeypatch
):
    c, y, seeds = torch.tensor([0, 3, 5, 9]), torch.tensor([0, 1, 2, 3]), [11, 12, 13, 14]

    def fixed_batch(index, rank, seed, batch, num_c, num_y):  # micro-batch `index` takes its slice of the 4
        i = index * batch % 4
        return c[i : i + batch] % num_c, y[i : i + batch], seeds[i : i + batch]

    monkeypatch.setattr("ctrldiff.finetune.draw_batch", fixed_batch)
    # grad_norm is the norm of the mean gradient before clipping, which a 1e9 threshold leaves off.
    _, one = run(1, tmp_path / "one", batch_size=4, clip_grad_norm=1e9)
    _, two = run(1, tmp_path / "two", batch_size=2, grad_accumulation=2, clip_grad_norm=1e9)
    assert two["trajectories_per_update"] == one["trajectories_per_update"] == 4
    for key in ("loss", "grad_norm"):
        assert two["history"][0][key] == pytest.approx(one["history"][0][key], rel=1e-4)


def test_warm_up_starts_from_a_zero_rate_and_changes_the_later_updates(tmp_path):
    model, _ = run(1, tmp_path / "one", warmup_updates=2)
    zero_at_init = {n: p for n, p in trainable(model).items() if "lora_B" in n or "class_embedding" in n}
    # Update 1 runs at rate 0: it only fills Adam's moments, so the zero-initialised weights stay zero.
    assert zero_at_init and all(not p.any() for p in zero_at_init.values())
    _, warm = run(3, tmp_path / "warm", warmup_updates=2)
    _, none = run(3, tmp_path / "none")
    assert warm["history"][-1]["loss"] != none["history"][-1]["loss"]


def test_a_checkpoint_trained_against_another_reward_classifier_is_not_resumed(tmp_path):
    run(2, tmp_path / "ckpt")
    other = micro_reward()
    with torch.no_grad():
        other.net.head.bias.add_(1.0)
    _, result = run(3, tmp_path / "ckpt", reward=other)
    assert result["start_update"] == 0


def test_a_checkpoint_made_by_other_update_code_is_not_resumed(tmp_path, monkeypatch):
    run(2, tmp_path / "ckpt")
    monkeypatch.setattr("ctrldiff.finetune.source_hash", lambda *modules: "a fixed bug")
    _, result = run(3, tmp_path / "ckpt")
    assert result["start_update"] == 0 and len(result["history"]) == 3


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt", "state.json"])
def test_a_truncated_checkpoint_is_named_and_training_starts_afresh(tmp_path, name):
    fresh, uninterrupted = run(2, tmp_path / "fresh")
    run(1, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match=rf"starting afresh: {path}"):
        model, result = run(2, tmp_path / "ckpt")
    assert result["start_update"] == 0 and result["history"] == uninterrupted["history"]
    for n, p in trainable(fresh).items():
        torch.testing.assert_close(trainable(model)[n], p)


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path):
    run(1, tmp_path / "ckpt")
    before = (tmp_path / "ckpt/trainable.safetensors").read_bytes()
    with pytest.raises(FloatingPointError, match="non-finite loss.*checkpoint"):
        run(3, tmp_path / "ckpt", gamma=float("nan"))
    assert (tmp_path / "ckpt/trainable.safetensors").read_bytes() == before
    assert read_json(tmp_path / "ckpt/state.json")["update"] == 1


def test_each_update_and_rank_draw_their_own_noise():
    a = draw_batch(0, 0, 0, 4, 10, 4)
    again = draw_batch(0, 0, 0, 4, 10, 4)
    assert torch.equal(again[0], a[0]) and torch.equal(again[1], a[1]) and again[2] == a[2]
    assert draw_batch(1, 0, 0, 4, 10, 4)[2] != a[2] and draw_batch(0, 1, 0, 4, 10, 4)[2] != a[2]


def test_two_processes_hold_identical_trainable_parameters(tmp_path):
    """torchrun starts 2 CPU processes (gloo); accelerate picks them up as MULTI_CPU."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "tests/ddp_worker.py"),
        str(tmp_path),
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 x 2 processes" in proc.stdout
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert r0.keys() == r1.keys() and any("class_embedding" in k for k in r0)
    for name in r0:
        torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0, msg=name)
    init = trainable(add_control(micro_base(), [0, 1, 2, 3], lora_rank=2))
    assert any(not torch.equal(r0[n], init[n]) for n in r0 if "lora_B" in n or "class_embedding" in n)


def test_clipping_under_fp16s_grad_scaler_clips_the_unscaled_gradient():
    """With a GradScaler the gradients are x 65,536 until unscaled: clipping must come after unscaling,
    and the logged norm is the true one. Same gradients, once plain and once scaled."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from ctrldiff.finetune import clipped_step

    results = []
    for scaled in (False, True):
        AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton: fp16, then back
        w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        acc = Accelerator(cpu=True, mixed_precision="fp16" if scaled else "no")
        if scaled:  # accelerate makes no scaler on a CPU; give it the CUDA path's GradScaler
            acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**16), True
        opt = acc.prepare(torch.optim.SGD([w], lr=1.0))
        acc.backward((w * torch.tensor([30.0, 40.0, 0.0])).sum())  # gradient norm 50
        results.append((clipped_step(acc, opt, [w], max_norm=5.0), w.detach().clone()))
    AcceleratorState._reset_state(reset_partial_state=True)
    (norm, w_plain), (norm_scaled, w_scaled) = results
    assert norm == pytest.approx(50.0) and norm_scaled == pytest.approx(50.0)
    torch.testing.assert_close(w_scaled, w_plain)  # the step of the clipped gradient (3, 4, 0)
    torch.testing.assert_close(w_plain, torch.tensor([-2.0, -6.0, 0.5]))


def test_every_update_logs_the_reward_and_kl_per_requested_class(tmp_path):
    _, result = run(3, tmp_path / "ckpt", batch_size=4)
    for update, h in enumerate(result["history"]):
        y = draw_batch(update, 0, 0, 4, 3, 4)[1]
        counts = torch.bincount(y, minlength=4)
        drawn = [k for k in range(4) if counts[k]]
        assert {k for k in h if k.startswith(("reward_y", "kl_y"))} == {
            f"{m}_y{k}" for m in ("reward", "kl") for k in drawn
        }  # a class no request asked for has no entry
        # the per-class means average back to the update's means over its 4 requests
        assert sum(counts[k] * h[f"reward_y{k}"] for k in drawn) / 4 == pytest.approx(h["reward"], rel=1e-5)
        kl = sum(counts[k] * h[f"kl_y{k}"] for k in drawn) / 4
        assert kl == pytest.approx(h["kl_window"], rel=1e-5, abs=1e-5)
    assert "kl" in result["history"][1] and "kl" not in result["history"][0]  # probe updates: 2 and 3


def test_the_fingerprint_covers_what_changes_the_weights_and_nothing_else():
    from ctrldiff.finetune import NOT_FINGERPRINTED, fingerprint
    from ctrldiff.params import FinetuneParams, RolloutParams

    model, reward = add_control(micro_base(), [0, 1, 2, 3], lora_rank=2), micro_reward()
    cfg = micro_finetune()

    def key(cfg=cfg, gamma=10.0, code="abc"):
        return fingerprint(cfg, gamma, 0, 1, model, reward, code)

    changed = {
        "rollout": RolloutParams(steps=4),
        "batch_size": 3,
        "grad_accumulation": 2,
        "grad_steps": 1,
        "base_last_steps": 1,
        "lora_rank": 2,
        "lora_targets": ["to_q"],
        "lr_lora": 0.5,
        "lr_embedding": 0.5,
        "warmup_updates": 3,
        "weight_decay": 0.1,
        "beta1": 0.8,
        "beta2": 0.9,
        "clip_grad_norm": 1.0,
        "kl_reduction": "mean",
        "mixed_precision": "bf16",
        "solver": "adjoint",
    }
    unchanged = {
        "updates": 500,
        "decay_updates": 10,
        "checkpointing": True,
        "checkpoint_every": 7,
        "probe_every": 3,
        "probe_per_class": 9,
        "min_ess": 2.0,
    }
    assert set(changed) | set(unchanged) == set(FinetuneParams.model_fields)
    assert set(unchanged) == set(NOT_FINGERPRINTED)
    for field, value in changed.items():
        assert key(cfg.model_copy(update={field: value})) != key(), field
    for field, value in unchanged.items():
        assert key(cfg.model_copy(update={field: value})) == key(), field
    assert key(gamma=11.0) != key() and key(code="abd") != key()
    before = key()
    with torch.no_grad():
        model.base.encoder.embed.weight[0, 0] += 1  # the class (prompt) embeddings are the base's too
    assert key() != before


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_message(tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), str(ROOT / "tests/ddp_worker.py"), str(tmp_path), "--nan-on-rank1",
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # a hang fails here
    assert proc.returncode != 0
    assert proc.stderr.count("non-finite loss at update 0") >= 2, proc.stderr[-3000:]  # both ranks say it


def test_weighted_logs_its_probes_and_does_not_resume_on_other_base_trajectories(tmp_path):
    model, result = run(2, tmp_path / "ckpt", solver="weighted")
    first, second = result["history"]
    assert "reward" not in first and "loss" in first  # no rollout outside the probe updates
    assert {"reward", "kl", "probe/oracle_accuracy"} <= set(second)  # the probe: on-policy reward and KL
    assert np.array(result["ess"]).shape == (3, 4) and second["reward_queries"] == 12
    _, again = run(2, tmp_path / "ckpt", solver="weighted", trajectories_seed=100)
    assert again["start_update"] == 0  # other trajectories, other fit: trained afresh


def test_weighted_needs_the_base_trajectories(tmp_path):
    model = add_control(micro_base(), [0, 1, 2, 3], lora_rank=2)
    cfg = micro_finetune(updates=1, solver="weighted")
    with pytest.raises(ValueError, match="base_rollouts"):
        finetune(model, micro_reward(), 10.0, cfg, LABEL_META, 0, tmp_path / "ckpt")
