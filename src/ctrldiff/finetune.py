"""The CTRL training loop: one function, top to bottom (nanoGPT style).

accelerate provides devices, processes and mixed precision. The trainable parameters (LoRA and
the y-embedding) have their gradients averaged across processes explicitly after every
backward, so every rank holds identical parameters (the authors' y-embedding was never synced).
All randomness of update u comes from generators seeded by (seed, u, rank): a resumed run draws
exactly what the uninterrupted run would have drawn, and no update reuses another's noise.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers.optimization import get_wsd_schedule

from ctrldiff.control import ControlledModel, ControlledStep
from ctrldiff.ctrl import LossTerms, RolloutConfig
from ctrldiff.io import atomic_dir
from ctrldiff.oracles import to_uint8
from ctrldiff.params import FinetuneParams
from ctrldiff.provenance import source_hash
from ctrldiff.sampling import SamplerConfig, sample
from ctrldiff.solvers import Adjoint, Backprop, Weighted
from ctrldiff.tasks import class_counts, control_tasks, join, oracle_classes, split_joint
from ctrldiff.tilt import Trajectories

# FinetuneParams fields that change no trained weight (a run resumes across them) or only lengthen
# the run: `updates` may grow and `decay_updates` be appended (a cool-down) to a finished run.
NOT_FINGERPRINTED = (
    "updates",
    "decay_updates",
    "checkpointing",
    "checkpoint_every",
    "probe_every",
    "probe_per_class",
    "min_ess",  # a warning's threshold
)


def config_hash(*sections) -> str:
    """Fingerprint of the settings a checkpoint belongs to (a changed setting starts afresh)."""
    text = json.dumps([s.model_dump() if hasattr(s, "model_dump") else s for s in sections], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensors_hash(named: dict[str, torch.Tensor]) -> str:
    """Fingerprint of named tensors' exact bytes."""
    digest = hashlib.sha256()
    for name, tensor in named.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_hash(*modules: torch.nn.Module) -> str:
    """Fingerprint of modules' weights: a checkpoint trained against another reward or base is not resumed."""
    return tensors_hash({f"{i}.{n}": t for i, m in enumerate(modules) for n, t in m.state_dict().items()})


def fingerprint(
    cfg: FinetuneParams,
    gamma: float,
    seed: int,
    processes: int,
    model: ControlledModel,
    reward,
    code: str,
    trajectories: Trajectories | None = None,
) -> str:
    """Everything that changes the trained weights: the recipe, gamma, seed, process count, the base's
    weights (its UNet and class encoder: the prompts at paper scale), the fresh adapter, the reward's
    weights, the source of the code that runs an update (``code``: a provenance.source_hash) and,
    for the weighted solver, the base trajectories it fits."""
    recipe = cfg.model_dump(exclude=set(NOT_FINGERPRINTED))
    weights = weights_hash(reward, model.base.unet, model.base.encoder)
    data = "" if trajectories is None else tensors_hash({"states": trajectories.states, "c": trajectories.c})
    return config_hash(recipe, gamma, seed, processes, weights, code, data)


def _trainable(model: ControlledModel) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.base.unet.named_parameters() if p.requires_grad}


def save_checkpoint(
    directory: Path, model: ControlledModel, opt, update: int, fingerprint: str, history: list[dict]
) -> None:
    """Trainable weights, optimizer state, the update count and the log so far, atomically."""
    with atomic_dir(directory) as tmp:
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
            tmp / "trainable.safetensors",
        )
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"update": update, "config": fingerprint}))
        (tmp / "history.json").write_text(json.dumps(history))


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read back; the message names the file."""


# What a truncated or garbled checkpoint file raises on reading, by format.
_READ_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    RuntimeError,
    EOFError,
    SafetensorError,
    pickle.UnpicklingError,
)


def _read_checkpoint(directory: Path, model: ControlledModel) -> tuple[dict, dict, dict, list[dict]]:
    """Every file of a checkpoint, read and checked before anything is restored from it."""
    names = {n: p.shape for n, p in _trainable(model).items()}
    path = directory / "state.json"
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not (
            isinstance(state.get("update"), int) and isinstance(state.get("config"), str)
        ):
            raise ValueError("it needs an integer 'update' and a string 'config'")
        path = directory / "trainable.safetensors"
        weights = load_file(path)
        if {n: w.shape for n, w in weights.items() if n in names} != names:
            raise ValueError("its tensors are not this model's trainable parameters")
        path = directory / "optimizer.pt"
        optimizer = torch.load(path, weights_only=False)
        path = directory / "history.json"
        history = json.loads(path.read_text()) if path.is_file() else []
    except _READ_ERRORS as err:
        raise CorruptCheckpoint(f"{path}: {type(err).__name__}: {err}") from err
    return state, weights, optimizer, history


def load_checkpoint(directory: Path, model: ControlledModel, opt, fingerprint: str) -> tuple[int, list[dict]]:
    """Restore a checkpoint of the same configuration: (the update to continue from, the log so far).

    The checkpoint is a cache, not the result: one that cannot be read (a truncated file, say) is
    reported by name and training starts afresh, with nothing restored from it.
    """
    if not (directory / "state.json").is_file():
        return 0, []
    try:
        state, weights, optimizer, history = _read_checkpoint(directory, model)
    except CorruptCheckpoint as err:
        warnings.warn(f"finetune: cannot resume from the checkpoint, starting afresh: {err}", stacklevel=2)
        return 0, []
    if state["config"] != fingerprint:
        print(f"finetune: checkpoint in {directory} belongs to other settings or code; starting afresh")
        return 0, []
    with torch.no_grad():
        for name, p in _trainable(model).items():
            p.copy_(weights[name])
    opt.load_state_dict(optimizer)
    return state["update"], history[: state["update"]]


def draw_batch(update: int, rank: int, seed: int, batch: int, num_c: int, num_y: int) -> tuple:
    """(c, y, noise seeds) of one process at one update: y uniform over classes, c over the base's."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, update, rank]).generate_state(1)[0]))
    c = torch.randint(0, num_c, (batch,), generator=g)
    y = torch.randint(0, num_y, (batch,), generator=g)
    seeds = torch.randint(0, 2**62, (batch,), generator=g).tolist()
    return c, y, seeds


@torch.no_grad()
def probe(model: ControlledModel, label_meta: dict, sampler: SamplerConfig, per_class: int) -> dict:
    """Oracle statistics on a fixed probe batch: mean score per requested class of each task, accuracy.

    With several control tasks, also each task's accuracy; ``probe/oracle_accuracy`` is the joint one.
    """
    num_y = len(model.y_classes)
    y = torch.arange(num_y).repeat_interleave(per_class)
    c = torch.arange(len(y)) % len(model.base.classes)
    seeds = [10**6 + i for i in range(len(y))]
    images = sample(model.base, c, seeds, sampler, y, model.y_null, ControlledStep(model))
    pixels, tasks, counts = to_uint8(images), control_tasks(label_meta), class_counts(label_meta)
    stats, achieved = {}, []
    for task, asked, k in zip(tasks, split_joint(y.numpy(), counts), counts, strict=True):
        spec = label_meta["tasks"][task]
        scores, got = oracle_classes(pixels, spec)
        stats |= {f"probe/{spec['score']}_y{j}": float(scores[asked == j].mean()) for j in range(k)}
        if len(tasks) > 1:
            stats[f"probe/{task}_accuracy"] = float((got == asked).mean())
        achieved.append(got)
    stats["probe/oracle_accuracy"] = float((join(achieved, counts) == y.numpy()).mean())
    return stats


def per_class_sums(terms: LossTerms, y: torch.Tensor, num_y: int) -> torch.Tensor:
    """(3, num_y): per requested class, the count, the summed log p̂ and the summed window KL."""
    onehot = torch.nn.functional.one_hot(y.cpu(), num_y).float().T  # (num_y, N)
    return torch.stack([onehot.sum(1), onehot @ terms.log_p.cpu(), onehot @ terms.kl_window.cpu()])


def clipped_step(accelerator: Accelerator, opt, params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Average the gradients over processes, unscale (fp16's GradScaler) and clip them, step.

    Returns the unscaled gradient norm before clipping. accelerate's clip_grad_norm_ unscales first:
    clipping the scaled gradients (x 65,536) would make every update a normalised step.
    """
    for p in params:  # every rank takes the same step (the authors' y-embedding was never synced)
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad, reduction="mean")
    norm = float(accelerator.clip_grad_norm_(params, max_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def finetune(
    model: ControlledModel,
    reward: torch.nn.Module,
    gamma: float,
    cfg: FinetuneParams,
    label_meta: dict,
    seed: int,
    checkpoint_dir: Path,
    live=None,
    code: tuple[str, ...] = ("ctrldiff.finetune",),
    trajectories: Trajectories | None = None,
) -> dict:
    """Run CTRL updates of ``cfg.solver`` until ``cfg.updates``, resuming from ``checkpoint_dir``.

    ``reward`` has ``log_prob(x, y)`` and per-class scores (a Classifier or a tasks.JointReward).
    Rollouts use ``cfg.rollout``. ``trajectories``: the base's own (stage `base_rollouts`), which the
    weighted solver fits. ``code``: the modules whose source (with what they import) the checkpoint
    fingerprints; a stage passes its own. Only the main process writes the checkpoint and the log;
    the returned history covers every update, those before a resume included.
    """
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes (gloo) when launched with torchrun
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accumulation,
    )
    device = accelerator.device
    set_seed(seed)
    base = model.base
    base.to(device)
    reward.to(device)
    reward.requires_grad_(False)
    lora, emb = model.trainable_parameters()
    params = lora + emb
    opt = torch.optim.AdamW(
        [{"params": lora, "lr": cfg.lr_lora}, {"params": emb, "lr": cfg.lr_embedding}],
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
    )
    opt = accelerator.prepare(opt)
    ro = cfg.rollout
    rollout_cfg = RolloutConfig(ro.steps, ro.eta, ro.guidance_scale, cfg.grad_steps, cfg.checkpointing)
    sampler = SamplerConfig(ro.steps, ro.eta, ro.guidance_scale)
    if cfg.solver == "weighted":
        if trajectories is None:
            raise ValueError(
                "finetune.solver = weighted needs the base trajectories: run `dvc repro base_rollouts`"
            )
        solver = Weighted(reward, gamma, rollout_cfg, cfg.kl_reduction, trajectories, model, cfg.min_ess)
    elif cfg.solver == "adjoint":
        solver, trajectories = Adjoint(reward, gamma, rollout_cfg, cfg.kl_reduction), None
    else:
        solver, trajectories = Backprop(reward, gamma, rollout_cfg, cfg.kl_reduction), None
    print_ = accelerator.print
    key = fingerprint(
        cfg, gamma, seed, accelerator.num_processes, model, reward, source_hash(*code), trajectories
    )
    start, history = load_checkpoint(checkpoint_dir, model, opt, key)
    # Both rates: linear warm-up, constant, linear decay to 0 over the last `decay_updates`. A function
    # of the update alone, built at `start` from the current settings (so it is not checkpointed), and
    # stepped once per update by hand (accelerate's wrapper would step once per process).
    sched = get_wsd_schedule(
        opt, cfg.warmup_updates, cfg.decay_updates, cfg.updates, decay_type="linear", last_epoch=start - 1
    )
    per_update = cfg.batch_size * accelerator.num_processes * cfg.grad_accumulation
    print_(
        f"finetune ({cfg.solver}): {per_update} requests per update = {cfg.batch_size} x "
        f"{accelerator.num_processes} processes x {cfg.grad_accumulation} accumulation; "
        f"starting at update {start}"
    )
    num_y = len(model.y_classes)

    def log(stats: dict) -> None:
        if live is not None and accelerator.is_main_process:
            live.step = stats["update"]
            for k, v in stats.items():
                if k != "update":
                    live.log_metric(k, v)
            live.next_step()

    for stats in history:  # a resumed run's log starts with the updates made before the interruption
        log(stats)
    bar = tqdm(
        range(start, cfg.updates), desc="finetune", unit="update", disable=not accelerator.is_main_process
    )
    for update in bar:
        probing = (update + 1) % cfg.probe_every == 0 or update + 1 == cfg.updates
        stats_sum: dict[str, float] = {}
        classes = torch.zeros(3, num_y)
        bad = torch.zeros(())
        for micro in range(cfg.grad_accumulation):
            c, y, seeds = draw_batch(
                update * cfg.grad_accumulation + micro,
                accelerator.process_index,
                seed,
                cfg.batch_size,
                len(base.classes),
                num_y,
            )
            with accelerator.autocast():
                loss, terms = solver(model, c, y, seeds, probing)
            bad = bad + (~torch.isfinite(loss.detach())).float().cpu()
            accelerator.backward(loss)  # divides by grad_accumulation itself: the mean over micro-batches
            stats = {"loss": loss.item()} | ({} if terms is None else terms.stats())
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v / cfg.grad_accumulation
            if terms is not None:
                classes += per_class_sums(terms, y, num_y)
        # Every rank learns whether any rank went non-finite, and all stop together (no rank left
        # waiting in an all-reduce for one that raised).
        if float(accelerator.reduce(bad.to(device), "sum")) > 0:
            raise FloatingPointError(
                f"finetune: non-finite loss at update {update} ({stats_sum} on rank "
                f"{accelerator.process_index}); the last good checkpoint in {checkpoint_dir} is intact. "
                "Lower finetune.lr_lora / lr_embedding or gamma."
            )
        stats_sum = {
            k: float(accelerator.reduce(torch.tensor(v, device=device), "mean")) for k, v in stats_sum.items()
        }
        count, reward_sum, kl_sum = accelerator.reduce(classes.to(device), "sum").cpu()
        for k in torch.nonzero(count).flatten().tolist():  # per requested class drawn (the paper's Fig. 1a)
            stats_sum[f"reward_y{k}"] = reward_sum[k].item() / count[k].item()
            stats_sum[f"kl_y{k}"] = kl_sum[k].item() / count[k].item()
        stats_sum["lr_lora"] = opt.param_groups[0]["lr"]  # the rate this update steps with
        stats_sum["grad_norm"] = clipped_step(accelerator, opt, params, cfg.clip_grad_norm)
        sched.step()

        if probing:
            stats_sum |= probe(model, label_meta, sampler, cfg.probe_per_class)
        # reward queries: the weighted solver scored its base images once, before the first update
        stats_sum["reward_queries"] = (
            (update + 1) * per_update if trajectories is None else len(trajectories.c)
        )
        history.append({"update": update + 1} | stats_sum)
        bar.set_postfix(
            {k: f"{stats_sum[k]:.3f}" for k in ("loss", "reward", "kl_window") if k in stats_sum},
            refresh=False,
        )
        log(history[-1])
        if accelerator.is_main_process and (
            (update + 1) % cfg.checkpoint_every == 0 or update + 1 == cfg.updates
        ):
            save_checkpoint(checkpoint_dir, model, opt, update + 1, key, history)
        accelerator.wait_for_everyone()
    out = {"start_update": start, "history": history, "trajectories_per_update": per_update}
    if isinstance(solver, Weighted):
        out["ess"] = solver.ess.tolist()  # (c, y): the effective base images behind each target
    return out
