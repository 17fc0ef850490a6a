"""Trains the bundled `tinyworld` model and its evaluator from scratch; resumable, a GPU is used when there is one.

The recipe's wall time is in the README (it depends on the CPU: a UNet step at batch 64 has taken 0.5 s on one
two-core machine and 1.4 s on another); every stage resumes from --work_dir, and a GPU is used when there is one.

    python scripts/train_tinyworld.py --work_dir runs/tinyworld --output_dir genreg/tinyworld/model

Stages (each resumes from what the previous run left in --work_dir):
  1. render the training pools (base distribution without HELD_OUT values; full distribution for evaluator and VAE)
  2. VAE: AutoencoderKL 64x64x3 <-> 16x16x4             -> vae/
  3. evaluator: slot-wise attribute classifier, on renders and their VAE reconstructions -> evaluator.safetensors
  4. encode the base pool once through the VAE          -> latents.safetensors
     With --latent_norm channel (the default) each latent channel is standardised and the map folded into the VAE,
     whose scaling factor is then 1. This VAE's channels differ ~12x in spread, and with SD's one global factor
     (--latent_norm global) the UNet learnt objects far more slowly: training-time score 0.06 against 0.79 at step
     8,250 of the same 11,000-step recipe (see the README).
  5. UNet + CLIP text encoder, v-prediction (or epsilon) objective, EMA weights, in two phases. Before
     --layout_from_step: min-SNR-5 weighting, 45% of captions name the background (shapes and colours). From it on
     (the layout phase): the x0 error is weighted by the SNR clamped to [0.25, 5] and most captions name the
     background. With plain min-SNR weighting, or with the background left unnamed (white and black backgrounds then
     average the object away from the mean image), the high-noise steps that decide the layout teach nothing and
     position words are ignored. Captions name each object's pattern, and apart its outline, with probability
     --caption_detail_p, so both have a path from text and are drawn at their training frequencies when unnamed.
     The UNet starts as SD's training code started it (--unet_init zero_residual: each residual branch's last layer
     and the output conv at zero). Every --eval_every steps the EMA model samples prompts (25 DDIM steps, guidance
     5), the evaluator scores them, the best is kept, and its x0 error per timestep band is logged.
  6. the best EMA model is written as a diffusers StableDiffusionPipeline (safetensors) to --output_dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from genreg.io import atomic_write, atomic_write_text
from genreg.sd import to_space
from genreg.tinyworld.architecture import (
    UNET_LAYOUT,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    standardize_latent_channels,
    zero_residual_outputs,
)
from genreg.tinyworld.evaluator import Evaluator, EvaluatorNet, evaluator_loss, scene_targets
from genreg.tinyworld.render import render_many
from genreg.tinyworld.world import OBJECT_ATTRIBUTES, Scene, caption, sample_scene, scene_prompt
from genreg.training import flatten_optimizer_state, unflatten_optimizer_state


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp)))


def atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)

    atomic_write(path, write)


def minimise(model: torch.nn.Module, loss_fn, steps: int, lr: float, weight_decay: float, name: str) -> None:
    """AdamW under a one-cycle schedule: the evaluator's and the VAE's fits."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"{name} step {step} loss {loss.item():.5f}")


# ---------------------------------------------------------------------------------------------------------------------
# 1. Data


def make_pool(path: Path, n: int, seed: int, holdout: bool, processes: int) -> tuple[np.ndarray, list[Scene]]:
    if not path.exists():
        rng = random.Random(seed)
        scenes = [sample_scene(rng, holdout=holdout) for _ in range(n)]
        t = time.time()
        images = render_many(scenes, processes)
        log(f"rendered {n} scenes in {time.time() - t:.0f}s -> {path.name}")
        atomic_npz(path, images=images, scenes=np.array([json.dumps(s.to_dict()) for s in scenes]))
    data = np.load(path)
    return data["images"][:n], [Scene.from_dict(json.loads(s)) for s in data["scenes"][:n]]


def to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


# ---------------------------------------------------------------------------------------------------------------------
# 2. Evaluator


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shifts of up to 2 px, blur, noise and colour jitter: generated images are never pixel-perfect renders."""
    b = len(x)
    dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = torch.rand(b, 1, 1, 1, generator=g) * 0.6
    x = (1 - w) * x + w * blurred
    x = x * (1 + 0.06 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)) + 0.04 * (
        torch.rand(b, 1, 1, 1, generator=g) - 0.5
    )
    x = x + torch.randn(x.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.04
    return x.clamp(0, 1)


def train_evaluator(
    images: np.ndarray, scenes: list[Scene], steps: int, device: torch.device, seed: int
) -> EvaluatorNet:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    targets = torch.from_numpy(np.stack([scene_targets(s)[0] for s in scenes]))
    backgrounds = torch.tensor([scene_targets(s)[1] for s in scenes])
    net = EvaluatorNet().to(device)

    def loss() -> torch.Tensor:
        idx = torch.randint(0, len(images), (64,), generator=g)
        x = augment(to_float(images[idx.numpy()]), g).to(device)
        return evaluator_loss(net, x, targets[idx].to(device), backgrounds[idx].to(device))

    minimise(net, loss, steps, lr=2e-3, weight_decay=1e-4, name="evaluator")
    return net.eval().cpu()


# ---------------------------------------------------------------------------------------------------------------------
# 3. VAE


def train_vae(images: np.ndarray, steps: int, device: torch.device, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = build_vae().to(device)

    def loss() -> torch.Tensor:
        idx = torch.randint(0, len(images), (32,), generator=g).numpy()
        # The VAE is convolutional: random 32x32 crops (on the latent grid) train it at a quarter of the cost.
        top, left = (4 * torch.randint(0, 9, (2,), generator=g)).tolist()
        x = to_float(images[idx, top : top + 32, left : left + 32]).to(device) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        return F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()

    minimise(vae, loss, steps, lr=1e-3, weight_decay=0.0, name="vae")
    return vae.eval().cpu()


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Images -> VAE latent mean -> decoded images, uint8."""
    vae = vae.to(device)
    out = [images[:0]]  # uint8 NHWC, so no images give an empty array
    for i in range(0, len(images), 256):
        x = vae.decode(vae.encode(to_float(images[i : i + 256]).to(device) * 2 - 1).latent_dist.mean).sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def encode(vae, images: np.ndarray, device: torch.device) -> torch.Tensor:
    vae = vae.to(device)
    out = [
        vae.encode(to_float(images[i : i + 256]).to(device) * 2 - 1).latent_dist.mean.cpu()
        for i in range(0, len(images), 256)
    ]
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------------
# 5. UNet + text encoder


def eval_prompts(n_single: int, n_double: int, seed: int, details: bool) -> list[str]:
    """Single- then two-object prompts; with ``details``, every second one also names pattern and outline."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, 1) for _ in range(n_single)] + [sample_scene(rng, 2) for _ in range(n_double)]
    return [scene_prompt(scene, details=details and k % 2 == 1) for k, scene in enumerate(scenes)]


@torch.no_grad()
def sample_and_score(pipe, evaluator: Evaluator, prompts: list[str], seed: int, guidance: float = 5.0) -> dict:
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(0, len(prompts), 64):
        g = torch.Generator().manual_seed(seed + i)
        images += pipe(
            prompts[i : i + 64], num_inference_steps=25, guidance_scale=guidance, generator=g, output_type="pil"
        ).images
    return evaluator.score(images, prompts)


X0_BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))


@torch.no_grad()
def x0_error_by_band(pipe, latents: torch.Tensor, scenes: list[Scene], n: int = 512) -> dict[str, list[float]]:
    """Mean squared x0 error of the denoiser on the first ``n`` training latents (cycled if fewer), noised at fixed
    timesteps (an equal share in each band of ``X0_BANDS``), with the full prompt (background, pattern, outline named)
    and with the empty prompt. Where a run stalls shows here: the high bands decide the layout, the low the detail."""
    g = torch.Generator().manual_seed(0)
    per_band = max(1, min(n, len(latents)) // len(X0_BANDS))
    t = torch.cat([torch.randint(lo, hi, (per_band,), generator=g) for lo, hi in X0_BANDS])
    x0 = latents[torch.arange(len(t)) % len(latents)] * pipe.vae.config.scaling_factor
    x_t = pipe.scheduler.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    alpha_bar = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    prompts = {
        "prompt": [scene_prompt(scenes[i % len(scenes)], background=True, details=True) for i in range(len(t))],
        "empty": [""],
    }
    out = {}
    for name, texts in prompts.items():
        ids = pipe.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids.to(pipe.device))[0].expand(len(t), -1, -1)
        pred = torch.cat(
            [
                pipe.unet(
                    x_t[i : i + 128].to(pipe.device), t[i : i + 128].to(pipe.device), cond[i : i + 128]
                ).sample.cpu()
                for i in range(0, len(t), 128)
            ]
        )
        x0_hat = to_space(pred, x_t, alpha_bar, pipe.scheduler.config.prediction_type, "x0")
        err = (x0_hat - x0).pow(2).mean(dim=(1, 2, 3)).view(len(X0_BANDS), per_band).mean(dim=1)
        out[name] = [round(v, 4) for v in err.tolist()]
    return out


def train_denoiser(args, latents: torch.Tensor, scenes: list[Scene], vae, evaluator: Evaluator, work: Path, device):
    # Seeded here, not by the stages before: a run that finds its data, VAE and evaluator already in --work_dir
    # starts the denoiser exactly as one that made them. (A resumed run restores the RNG state below.)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    unet_layout = {"widths": args.unet_widths, "attention": args.unet_attention, "heads": args.unet_heads}
    unet, text_encoder = build_unet(**unet_layout), build_text_encoder(len(tokenizer))
    if args.init_model is not None:  # go on from a trained model (its layout must be this run's)
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(args.init_model / "unet").state_dict())
        text_encoder.load_state_dict(CLIPTextModel.from_pretrained(args.init_model / "text_encoder").state_dict())
    elif args.unet_init == "zero_residual":
        zero_residual_outputs(unet)
    scheduler = build_scheduler(args.prediction_type)
    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}).to(device)
    ema = {k: v.detach().clone() for k, v in models.state_dict().items()}
    opt = torch.optim.AdamW(models.parameters(), lr=args.lr, weight_decay=1e-2)
    step, best = 0, {"score": -1.0}
    ckpt = work / "denoiser_checkpoint"
    # What the weights mean: a checkpoint trained otherwise is not resumed with these flags.
    setup = {
        "latent_norm": args.latent_norm,
        "prediction_type": args.prediction_type,
        "unet": [list(unet.config.down_block_types), list(unet.config.block_out_channels)],
    }
    if list(unet.config.attention_head_dim) not in ([4, 4, 4], [2, 2, 2]):  # new: earlier checkpoints still resume
        setup["unet_heads"] = list(unet.config.attention_head_dim)
    if args.caption_detail_p:  # recorded only when set, so first-model checkpoints still resume with 0
        setup["caption_detail_p"] = args.caption_detail_p
    for name in ("init_model", "focus", "focus_weight"):  # recorded only when set, as above
        if getattr(args, name):
            setup[name] = str(getattr(args, name))
    if (ckpt / "state.json").exists():
        meta = json.loads((ckpt / "state.json").read_text())
        if meta.get("setup", setup) != setup:
            raise SystemExit(
                f"{ckpt} was trained with {meta['setup']}, but this run asks for {setup}: pass the same flags to"
                " resume it, or start in a new --work_dir"
            )
        models.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        ema = load_file(str(ckpt / "ema.safetensors"))
        groups = {"param_groups": opt.state_dict()["param_groups"]}
        opt.load_state_dict(unflatten_optimizer_state(load_file(str(ckpt / "optimizer.safetensors")), groups))
        step, best = meta["step"], meta["best"]
        torch.set_rng_state(load_file(str(ckpt / "rng.safetensors"))["torch"])
        log(f"resumed denoiser training at step {step}")
    rng = random.Random(args.seed + step)
    alphas = scheduler.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    n_single = int(round(0.7 * args.eval_prompts))
    prompts = eval_prompts(n_single, args.eval_prompts - n_single, seed=12345, details=args.caption_detail_p > 0)

    def lr_at(s: int) -> float:
        warm = 200
        if s < warm:
            return args.lr * (s + 1) / warm
        p = (s - warm) / max(1, args.unet_steps - warm)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    def ema_pipeline():
        te, un = build_text_encoder(len(tokenizer)), build_unet(**unet_layout)
        te.load_state_dict({k[len("text_encoder.") :]: v for k, v in ema.items() if k.startswith("text_encoder.")})
        un.load_state_dict({k[len("unet.") :]: v for k, v in ema.items() if k.startswith("unet.")})
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=tokenizer,
            unet=un,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).to(device)

    weights = focus_weights(scenes, args.focus, args.focus_weight)
    if args.focus:
        log(
            f"{(weights > 1).float().mean().item():.1%} of the training scenes hold a focus object,"
            f" drawn x{args.focus_weight}"
        )
    t0 = time.time()
    while step < args.unet_steps:
        layout = step >= args.layout_from_step
        batch = args.batch_size if layout else args.shapes_batch_size
        idx = (
            torch.multinomial(weights, batch, replacement=True)
            if args.focus
            else torch.randint(0, len(latents), (batch,))
        )
        background_p = args.caption_background_p if layout else 0.45
        texts = [
            "" if rng.random() < 0.1 else caption(scenes[i], rng, background_p, args.caption_detail_p)
            for i in idx.tolist()
        ]
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        x0 = latents[idx].to(device) * vae.config.scaling_factor
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), device=device)
        xt = scheduler.add_noise(x0, noise, t)
        cond = text_encoder(ids.to(device))[0]
        pred = unet(xt, t, cond).sample
        # Weight on the x0 error: min-SNR-5 (Hang et al. 2023), i.e. SNR clamped to at most 5. In the layout phase
        # it is also clamped from below, so the high-noise steps, where the layout is decided, weigh something:
        # plain min-SNR gives them weight SNR (< 0.03 for t > 600).
        x0_weight = snr[t].clamp(args.min_x0_weight if layout else 0.0, 5.0)
        if args.prediction_type == "epsilon":  # eps error = SNR * x0 error
            target, weight = noise, x0_weight / snr[t]
        else:  # v error = (SNR + 1) * x0 error
            target, weight = scheduler.get_velocity(x0, noise, t), x0_weight / (snr[t] + 1)
        loss = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0).item()
        opt.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in models.state_dict().items():
                ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        if step % 100 == 0:
            log(
                f"denoiser step {step} loss {loss.item():.4f} grad norm {grad_norm:.3f}"
                f" ({(time.time() - t0) / 100:.2f}s/step)"
            )
            t0 = time.time()
        if step % args.eval_every == 0 or step == args.unet_steps:
            pipe = ema_pipeline()
            scores = sample_and_score(pipe, evaluator, prompts, seed=0)
            log(f"eval step {step}: {json.dumps({k: round(v, 3) for k, v in scores.items()})}")
            log(f"x0 error in t bands {X0_BANDS}: {json.dumps(x0_error_by_band(pipe, latents, scenes))}")
            if scores["all_correct"] > best["score"]:
                best = {"score": scores["all_correct"], "step": step, "scores": scores}
                atomic_save(ema, work / "best_ema.safetensors")
                log(f"new best at step {step}")
            t0 = time.time()
        if step % args.checkpointing_steps == 0 or step == args.unet_steps:

            def write_checkpoint(tmp: Path, step: int = step, best: dict = best) -> None:
                tmp.mkdir()
                save_file({k: v.contiguous() for k, v in models.state_dict().items()}, str(tmp / "model.safetensors"))
                save_file(ema, str(tmp / "ema.safetensors"))
                save_file(flatten_optimizer_state(opt.state_dict())[0], str(tmp / "optimizer.safetensors"))
                save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
                (tmp / "state.json").write_text(json.dumps({"step": step, "best": best, "setup": setup}))

            atomic_write(ckpt, write_checkpoint)
    ema.update(load_file(str(work / "best_ema.safetensors")))
    log(f"best EMA model: step {best['step']} all_correct {best['score']:.3f}")
    return ema_pipeline().to("cpu"), best


def focus_weights(scenes: list[Scene], focus: list[str], weight: float) -> torch.Tensor:
    """Sampling weight per training scene: ``weight`` for a scene holding an object that matches one of ``focus``
    ("small orange": every word is one of the object's values), 1 otherwise."""
    wanted = [set(phrase.split()) for phrase in focus]
    values = [[set(asdict(o).values()) for o in scene.objects] for scene in scenes]
    return torch.tensor([weight if any(w <= v for w in wanted for v in objs) else 1.0 for objs in values])


def focus_phrase(text: str) -> str:
    """argparse type of --focus: words that are values of a tiny-world object."""
    known = {v for values in OBJECT_ATTRIBUTES.values() for v in values}
    unknown = [w for w in text.split() if w not in known]
    if unknown or not text.split():
        raise argparse.ArgumentTypeError(
            f"{text!r}: a focus names an object's values, e.g. 'small orange' (not {', '.join(unknown) or 'nothing'})"
        )
    return text


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="runs/tinyworld", help="intermediate files and checkpoints (resumable)")
    p.add_argument("--output_dir", default="genreg/tinyworld/model", help="where the diffusers model is written")
    p.add_argument("--evaluator_out", default="genreg/tinyworld/evaluator.safetensors")
    p.add_argument("--base_pool", type=int, default=30000, help="training scenes without held-out values")
    p.add_argument("--full_pool", type=int, default=30000, help="scenes over every value (evaluator, VAE)")
    p.add_argument("--test_pool", type=int, default=5000, help="fresh scenes the evaluator is measured on")
    p.add_argument("--evaluator_steps", type=int, default=2500)
    p.add_argument("--vae_steps", type=int, default=2000)
    p.add_argument(
        "--evaluator_reconstructions",
        type=int,
        default=10000,
        help="full-pool images passed through the VAE for the evaluator to learn from (besides every render)",
    )
    p.add_argument("--unet_steps", type=int, default=11000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--unet_widths", type=int_list, default=UNET_LAYOUT["widths"], help="UNet channels per level")
    p.add_argument(
        "--unet_attention",
        type=int_list,
        default=UNET_LAYOUT["attention"],
        help="1 where a level has transformer blocks (self- and cross-attention), 0 where it is convolutional",
    )
    p.add_argument("--unet_heads", type=int_list, default=UNET_LAYOUT["heads"], help="attention heads per level")
    p.add_argument(
        "--unet_init",
        choices=("zero_residual", "default"),
        default="zero_residual",
        help="zero_residual: every residual branch's last layer and the output conv start at zero, as SD's own"
        " training code starts them; default: diffusers' (PyTorch's) init, as Tiny World 1 was trained",
    )
    p.add_argument(
        "--shapes_batch_size",
        type=int,
        default=None,
        help="batch size of the first phase, before --layout_from_step (default: --batch_size)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prediction_type", choices=("v_prediction", "epsilon"), default="v_prediction")
    p.add_argument(
        "--layout_from_step",
        type=int,
        default=2000,
        help="first step of the layout phase (the two options below); before it, min-SNR and 45%% of captions naming"
        " the background teach shapes and colours",
    )
    p.add_argument("--min_x0_weight", type=float, default=0.25, help="layout phase: lower clamp of the loss weight")
    p.add_argument(
        "--caption_background_p",
        type=float,
        default=0.8,
        help="layout phase: share of captions naming the background (unnamed, white and black backgrounds average"
        " the object out of the mean image, and position words teach nothing)",
    )
    p.add_argument(
        "--caption_detail_p",
        type=float,
        default=0.5,
        help="share of objects whose pattern is named in a caption, and (drawn apart) whose outline is; the others"
        " leave them to the model. 0 gives Tiny World 1's captions",
    )
    p.add_argument(
        "--latent_norm",
        choices=("channel", "global"),
        default="channel",
        help="channel: standardise each latent channel, folded into the VAE; global: one scaling factor (SD's way)",
    )
    p.add_argument(
        "--init_model",
        type=Path,
        default=None,
        help="start the UNet and text encoder from this diffusers model (e.g. the bundled one), not from scratch;"
        " put its VAE and the evaluator into --work_dir first, so the latents are its own",
    )
    p.add_argument(
        "--focus",
        type=focus_phrase,
        nargs="*",
        default=[],
        help="objects drawn more often in training, each as its values (e.g. 'small orange' 'small yellow')",
    )
    p.add_argument("--focus_weight", type=float, default=3.0, help="sampling weight of a scene holding a focus object")
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--eval_every", type=int, default=2750)
    p.add_argument("--eval_prompts", type=int, default=200, help="prompts sampled at each evaluation (70%% single)")
    p.add_argument("--checkpointing_steps", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=min(os.cpu_count() or 1, 16), help="render workers")
    args = p.parse_args()
    if args.evaluator_reconstructions < 0:
        p.error(f"--evaluator_reconstructions counts images, so it is 0 or more; got {args.evaluator_reconstructions}")
    if not 0.0 <= args.caption_detail_p <= 1.0:
        p.error(f"--caption_detail_p is a share, between 0 and 1; got {args.caption_detail_p}")
    if not len(args.unet_widths) == len(args.unet_attention) == len(args.unet_heads):
        p.error("--unet_widths, --unet_attention and --unet_heads give one value per level each")
    args.unet_attention = tuple(bool(a) for a in args.unet_attention)
    if args.focus_weight <= 0:
        p.error(f"--focus_weight is a sampling weight, above 0; got {args.focus_weight}")
    if args.init_model is not None and not (args.init_model / "unet" / "config.json").exists():
        p.error(f"--init_model {args.init_model} is not a diffusers model folder (no unet/config.json)")
    if args.shapes_batch_size is None:
        args.shapes_batch_size = args.batch_size
    if min(args.batch_size, args.shapes_batch_size) < 1:
        p.error(f"batch sizes are 1 or more; got {args.batch_size} and {args.shapes_batch_size}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log(f"device {device}, torch threads {torch.get_num_threads()}")

    base_images, base_scenes = make_pool(work / "pool_base.npz", args.base_pool, args.seed, True, args.processes)
    full_images, full_scenes = make_pool(work / "pool_full.npz", args.full_pool, args.seed + 1, False, args.processes)
    test_images, test_scenes = make_pool(work / "pool_test.npz", args.test_pool, args.seed + 2, False, args.processes)

    vae_dir = work / "vae"
    if not (vae_dir / "config.json").exists():
        vae = train_vae(np.concatenate([base_images, full_images]), args.vae_steps, device, args.seed)
        atomic_write(vae_dir, vae.save_pretrained)
    vae = AutoencoderKL.from_pretrained(vae_dir)

    # Generated images reach the world through the VAE decoder: the evaluator learns from renders and their
    # reconstructions alike (same labels), so it reads what the model can draw.
    # Decoding costs about 30 ms an image on two CPU cores: --evaluator_reconstructions bounds how many are made.
    n_recon = min(args.evaluator_reconstructions, len(full_images))
    recon_path = work / "recon_full.npz"
    recon = dict(np.load(recon_path)) if recon_path.exists() else {}
    if "test" not in recon or len(recon["full"]) != n_recon:
        recon = {
            "full": reconstruct(vae, full_images[:n_recon], device),
            "test": reconstruct(vae, test_images, device),
        }
        atomic_npz(recon_path, **recon)

    eval_path = work / "evaluator.safetensors"
    if not eval_path.exists():
        images = np.concatenate([full_images, recon["full"]])
        scenes = full_scenes + full_scenes[:n_recon]
        net = train_evaluator(images, scenes, args.evaluator_steps, device, args.seed)
        atomic_save(net.state_dict(), eval_path)
    evaluator = Evaluator.load(eval_path, device)
    acc = {
        "renders": evaluator.accuracy(test_images, test_scenes),
        "vae_reconstructions": evaluator.accuracy(recon["test"], test_scenes),
    }
    for name, value in acc.items():
        rounded = {k: round(v, 4) for k, v in value.items()}
        log(f"evaluator accuracy on {args.test_pool} fresh {name}: {json.dumps(rounded)}")
    atomic_write_text(work / "evaluator_accuracy.json", json.dumps(acc, indent=1))

    lat_path = work / "latents.safetensors"
    if not lat_path.exists():
        atomic_save({"latents": encode(vae, base_images, device)}, lat_path)
    latents = load_file(str(lat_path))["latents"]
    if args.latent_norm == "channel":
        mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
        standardize_latent_channels(vae, mean, std)
        latents, scale = (latents - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), 1.0
        log(f"latent channels standardised (std was {[round(v, 3) for v in std.tolist()]})")
    else:
        scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    log(f"latents {tuple(latents.shape)}, scaling factor {scale:.4f}")

    pipe, best = train_denoiser(args, latents, base_scenes, vae, evaluator, work, device)
    out = Path(args.output_dir)
    atomic_write(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    shutil.copyfile(eval_path, args.evaluator_out)
    summary = {"best": best, "evaluator_accuracy": acc, "wall_seconds_this_run": time.time() - start}
    atomic_write_text(work / "summary.json", json.dumps(summary, indent=1))
    log(f"wrote {out} and {args.evaluator_out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
