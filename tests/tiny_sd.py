"""A tiny Stable-Diffusion-shaped pipeline with random weights, saved locally (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def _byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol alone and with the end-of-word mark."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def build_tiny_sd(directory: Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny SD pipeline (8x8 latents, 16x16 images by default) to ``directory`` and return it."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=8,
        sample_size=2 * sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    tokenizer = CLIPTokenizer(vocab=_byte_level_vocab(), merges=[], model_max_length=77)
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return directory


def build_tiny_clip(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny open_clip model in open_clip's local-dir layout, and a LAION-layout aesthetic head for it.

    Returns (clip folder, head file). The head's last layer is scaled so scores spread around 5.
    """
    import json

    import open_clip
    from safetensors.torch import save_file

    from ctrldiff.aesthetic import AestheticHead

    torch.manual_seed(seed)
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    directory.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess})
    )
    model = open_clip.model.CLIP(**cfg)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, directory / "open_clip_model.safetensors"
    )
    head = AestheticHead(cfg["embed_dim"])
    with torch.no_grad():
        head.layers[7].weight.mul_(200.0)
        head.layers[7].bias.fill_(5.0)
    save_file(head.state_dict(), directory / "head.safetensors")
    return directory, directory / "head.safetensors"


def write_tiny_ava(root: Path, n: int = 24, size: int = 24, seed: int = 0) -> Path:
    """An AVA-shaped folder: AVA.txt (index, id, 10 vote counts, 2 tags, challenge) and images/<id>.jpg.

    Images range from flat to noisy so their JPEG sizes (and classes) differ.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        image_id = 1000 + i
        flat = rng.integers(0, 256, (1, 1, 3))
        noise = rng.normal(0, 100 * i / n, (size, size, 3))
        Image.fromarray((flat + noise).clip(0, 255).astype(np.uint8)).save(
            root / "images" / f"{image_id}.jpg"
        )
        votes = rng.integers(1, 20, 10)
        lines.append(" ".join(map(str, [i + 1, image_id, *votes, 0, 0, 1])))
    (root / "AVA.txt").write_text("\n".join(lines) + "\n")
    return root


def paper_params_on_tiny_models(paper_params: Path, tiny_models: dict[str, Path]) -> dict:
    """paper/params.yaml with local tiny paths and CPU-sized numbers; every other setting kept."""
    import yaml

    p = yaml.safe_load(paper_params.read_text())
    p["data"] |= {"path": str(tiny_models["ava"]), "resolution": 16}
    # 16x16 JPEGs are ~1 KB, far from the paper's 110/85/60 KB cuts: bin at quantiles instead.
    p["label"] |= {"binning": "quantile", "thresholds": []}
    p["label"]["second"] |= {"binning": "quantile", "thresholds": []}
    p["multitask"]["compressibility_thresholds"] = []
    p["aesthetic"] |= {"clip": str(tiny_models["clip"]), "head": str(tiny_models["head"])}
    p["base"]["pretrained"] = str(tiny_models["sd"])
    p["classifier"] |= {"epochs": 1, "width": 8, "batch_size": 16}
    p["sample"] |= {"steps": 4, "n_per_request": 1, "batch_size": 16}
    p["finetune"] |= {
        "rollout": {"steps": 4, "eta": 1.0, "guidance_scale": 7.5},
        "updates": 2,
        "batch_size": 2,
        "grad_accumulation": 1,
        "grad_steps": 2,
        "mixed_precision": "no",  # fp16 needs a GPU
        "checkpoint_every": 1,
        "probe_every": 1,
        "probe_per_class": 1,
    }
    return p


def build_tiny_models(root: Path) -> dict[str, Path]:
    """Tiny SD, tiny CLIP scorer (folder and head) and a 40-image AVA folder under ``root``."""
    clip, head = build_tiny_clip(root / "clip")
    sd, ava = build_tiny_sd(root / "tiny-sd"), write_tiny_ava(root / "AVA", n=40)
    return {"sd": sd, "clip": clip, "head": head, "ava": ava}


def main(root: str, params_file: str) -> None:
    """CI: build the tiny models under ``root`` and point ``params_file`` (paper/params.yaml) at them."""
    import yaml

    target = Path(params_file)
    params = paper_params_on_tiny_models(target, build_tiny_models(Path(root).resolve()))
    target.write_text(yaml.safe_dump(params, sort_keys=False))


if __name__ == "__main__":
    import sys

    main(*sys.argv[1:])
