"""Trains the bundled text-to-video model: an AnimateDiff motion adapter over the frozen Tiny World 2 image model.

    python scripts/train_tinyworld_video.py --work_dir runs/tinyworld_video

One command, seeded, resumable from --work_dir (a checkpoint every --checkpointing_steps), a GPU when there is one.
Stages:
  1. render --clips training clips (``genreg.tinyworld.video``: held-out values excluded, as for the image model) and
     encode their frames once through the bundled VAE            -> work_dir/latents.safetensors
  2. train diffusers' MotionAdapter inside UNetMotionModel (the image UNet frozen, so the adapter loads over the
     bundled model unchanged) with the image model's v-prediction objective, plus the text embeddings of the motion
     words (``VOCABULARY_ADDITIONS``' last group), which the image model never saw: the motion modules themselves see
     no text, so the words reach them only through the frozen cross-attention. Every other text-encoder row, and so
     every image prompt's result, stays as it was. EMA weights; every --eval_every steps they sample --eval_clips
     prompts and the per-frame evaluator scores them; the best (motion followed + identity kept, adherence breaking
     ties) is kept. ``--domain_lora_rank R`` also trains AnimateDiff's domain adapter (LoRA on the image layers'
     attention; the image weights stay frozen), written beside the adapter as diffusers LoRA weights.
  3. the best EMA adapter is written with ``save_pretrained`` to --output_dir, and the bundled model's tokenizer and
     text encoder, extended by the motion words, to --model_output_dir. Stock diffusers then loads it:
     ``AnimateDiffPipeline.from_pretrained(model, motion_adapter=MotionAdapter.from_pretrained(adapter))``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AnimateDiffPipeline, MotionAdapter, StableDiffusionPipeline, UNetMotionModel
from safetensors.torch import load_file, save_file

from genreg.io import atomic_write
from genreg.tinyworld import model_path
from genreg.tinyworld.architecture import build_motion_adapter, build_tokenizer
from genreg.tinyworld.video import MOTIONS, NUM_FRAMES, clip_caption, clip_prompt, render_clip, sample_clip
from genreg.tinyworld.world import VOCABULARY_ADDITIONS
from genreg.training.checkpoints import load_latest_intact, save_checkpoint
from genreg.video import DOMAIN_ADAPTER, add_domain_adapter


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def make_pool(work: Path, base: StableDiffusionPipeline, n: int, seed: int, device) -> tuple[torch.Tensor, list]:
    """Renders and encodes ``n`` clips once: latents (n, 4, frames, 16, 16) float16, and the clips."""
    path = work / "latents.safetensors"
    rng = random.Random(seed)
    clips = [sample_clip(rng) for _ in range(n)]
    if path.exists():
        return load_file(str(path))["latents"], clips
    vae, out = base.vae.to(device), []
    for i, clip in enumerate(clips):
        frames = torch.from_numpy(render_clip(clip)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        z = vae.encode(frames.to(device)).latent_dist.mean * vae.config.scaling_factor
        out.append(z.permute(1, 0, 2, 3).half().cpu())  # (4, frames, 16, 16)
        if (i + 1) % 500 == 0:
            log(f"encoded {i + 1}/{n} clips")
    latents = torch.stack(out)
    atomic_write(path, lambda tmp: save_file({"latents": latents}, str(tmp)))
    return latents, clips


def extend_text_encoder(base: StableDiffusionPipeline):
    """The world's tokenizer (with the motion words) and the bundled text encoder with rows for them, started at the
    mean of the trained rows; returns (tokenizer, text encoder, index of the first new row)."""
    tokenizer, text_encoder = build_tokenizer(), base.text_encoder
    old = text_encoder.get_input_embeddings().weight.shape[0]
    if old < len(tokenizer):
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            weight = text_encoder.get_input_embeddings().weight
            weight[old:] = weight[:old].mean(0) + 0.01 * torch.randn_like(weight[old:])
    else:  # already extended (training again over a model this script wrote): train the motion words' rows again
        old = min(tokenizer.convert_tokens_to_ids([w + "</w>" for w in VOCABULARY_ADDITIONS[-1]]))
    return tokenizer, text_encoder, old


def _relative(value):
    if not isinstance(value, str) or not Path(value).is_absolute():
        return value
    try:
        return str(Path(value).relative_to(Path.cwd()))
    except ValueError:
        return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default=str(model_path()))
    p.add_argument("--work_dir", default="runs/tinyworld_video")
    p.add_argument("--output_dir", default=str(model_path().with_name("motion_adapter")))
    p.add_argument(
        "--model_output_dir",
        default=None,
        help="where the extended tokenizer and text encoder go (default: the base model)",
    )
    p.add_argument(
        "--init_adapter",
        default=None,
        help="start from this motion adapter (e.g. the bundled one, to train it further) instead of a fresh one",
    )
    p.add_argument(
        "--domain_lora_rank",
        type=int,
        default=0,
        help="also train AnimateDiff's domain adapter, LoRA of this rank on the image layers' attention (0: none)",
    )
    p.add_argument("--clips", type=int, default=2400)
    p.add_argument("--max_train_steps", type=int, default=2000)
    p.add_argument("--train_batch_size", type=int, default=4, help="clips per step (each of 16 frames)")
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--embedding_learning_rate", type=float, default=3e-3)
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--checkpointing_steps", type=int, default=250)
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--eval_clips", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    init_domain = Path(args.init_adapter) / DOMAIN_ADAPTER if args.init_adapter else None
    init_domain = init_domain if init_domain is not None and init_domain.is_file() else None
    if init_domain and not args.domain_lora_rank:
        raise SystemExit(f"{args.init_adapter} has a domain adapter: pass its --domain_lora_rank to train on with it")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    base = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, safety_checker=None)
    latents, clips = make_pool(work, base, args.clips, args.seed, device)
    log(f"pool: {tuple(latents.shape)}")

    tokenizer, text_encoder, first_new = extend_text_encoder(base)
    if args.init_adapter:  # go on from an adapter (the motion words' rows come with the base model's encoder)
        adapter = MotionAdapter.from_pretrained(args.init_adapter)
    else:
        adapter = build_motion_adapter(base.unet.config.block_out_channels)
        with torch.no_grad():  # each temporal block starts as the identity (AnimateDiff zero-initialises its output)
            for name, module in adapter.named_modules():
                if name.endswith("proj_out"):
                    module.weight.zero_(), module.bias.zero_()
    unet = UNetMotionModel.from_unet2d(base.unet, adapter)
    unet.freeze_unet2d_params()
    if args.domain_lora_rank:
        add_domain_adapter(unet, args.domain_lora_rank)
        if init_domain:  # go on with the adapter's own domain adapter (same rank)
            from peft.utils import set_peft_model_state_dict

            lora = load_file(str(init_domain))
            set_peft_model_state_dict(unet, {k.removeprefix("unet."): v for k, v in lora.items()})
    text_encoder.requires_grad_(False)
    embeddings = text_encoder.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    new_rows = torch.zeros(len(embeddings), 1, dtype=torch.bool)
    new_rows[first_new:] = True
    embeddings.register_hook(lambda g: g * new_rows.to(g.device))  # only the motion words learn
    unet.to(device), text_encoder.to(device)
    motion = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(
        [
            {"params": list(motion.values()), "lr": args.learning_rate, "weight_decay": 1e-2},
            {"params": [embeddings], "lr": args.embedding_learning_rate, "weight_decay": 0.0},
        ]
    )
    trainable = {**{f"unet.{n}": p for n, p in motion.items()}, "text_embeddings": embeddings}
    ema = {k: v.detach().clone() for k, v in trainable.items()}
    step, best = 0, {"score": -1.0}
    setup = {"clips": args.clips, "seed": args.seed, "batch": args.train_batch_size}
    if args.domain_lora_rank:
        setup["domain_lora_rank"] = args.domain_lora_rank
    found = load_latest_intact(work)
    if found is not None:
        path, (step, tensors, optimizers, state) = found
        if state["setup"] != setup:
            raise SystemExit(
                f"{path} was trained with {state['setup']}, this run asks for {setup}: pass the same flags"
            )
        with torch.no_grad():
            for k, v in trainable.items():
                v.copy_(tensors[k])
            ema = {k: tensors[f"ema.{k}"] for k in trainable}
        opt.load_state_dict(optimizers["optimizer"])
        torch.set_rng_state(tensors["rng"])
        best = state["best"]
        log(f"resumed at step {step}")

    scheduler = base.scheduler
    alphas = scheduler.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    eval_rng = random.Random(12345)
    eval_clips = [sample_clip(eval_rng, motion=MOTIONS[i % len(MOTIONS)]) for i in range(args.eval_clips)]

    def lr_scale(s: int) -> float:
        warm = 100
        return (
            (s + 1) / warm
            if s < warm
            else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (args.max_train_steps - warm)))
        )

    pipe = AnimateDiffPipeline(
        vae=base.vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        motion_adapter=None,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)

    @contextmanager
    def ema_weights():
        with torch.no_grad():
            saved = {k: v.detach().clone() for k, v in trainable.items()}
            for k, v in trainable.items():
                v.copy_(ema[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in trainable.items():
                    v.copy_(saved[k])

    def evaluate() -> dict:
        from genreg.tinyworld.video_eval import VideoEvaluator

        prompts = [clip_prompt(c) for c in eval_clips]
        # Sampling and building the evaluator must not move training's random stream (a resumed run matches).
        with ema_weights(), torch.random.fork_rng(devices=[]):
            videos = [
                pipe(
                    prompt,
                    num_frames=NUM_FRAMES,
                    num_inference_steps=25,
                    guidance_scale=5.0,
                    output_type="np",
                    generator=torch.Generator().manual_seed(i),
                ).frames[0]
                for i, prompt in enumerate(prompts)
            ]
            return VideoEvaluator.load().score(videos, prompts)

    unet.train()
    t0 = time.time()
    while step < args.max_train_steps:
        idx = torch.randint(0, len(latents), (args.train_batch_size,))
        rng = random.Random(args.seed * 1_000_003 + step)  # the step's captions, the same after a resume
        texts = ["" if rng.random() < 0.1 else clip_caption(clips[i], rng) for i in idx.tolist()]
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        x0 = latents[idx].float().to(device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), device=device)
        a = alphas[t].view(-1, 1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        cond = text_encoder(ids.to(device))[0].repeat_interleave(x0.shape[2], dim=0)
        pred = unet(xt, t, cond).sample
        # The image model's weighting: x0 error times the SNR clamped to [0.25, 5] (v error = (SNR + 1) x0 error).
        weight = snr[t].clamp(0.25, 5.0) / (snr[t] + 1)
        loss = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3, 4))).mean()
        for group, lr in zip(opt.param_groups, (args.learning_rate, args.embedding_learning_rate), strict=True):
            group["lr"] = lr * lr_scale(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(motion.values()), 1.0).item()
        opt.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in trainable.items():
                ema[k].lerp_(v.detach(), 1 - decay)
        if step % 50 == 0:
            log(f"step {step} loss {loss.item():.4f} grad norm {grad_norm:.3f} ({(time.time() - t0) / 50:.2f}s/step)")
            t0 = time.time()
        if step % args.eval_every == 0 or step == args.max_train_steps:
            scores = evaluate()
            log(f"eval step {step}: {json.dumps({k: round(v, 3) for k, v in scores.items()})}")
            # both of the model's targets, motion followed and identity kept; adherence breaks ties (< one clip)
            score = scores["motion_followed"] + scores["identity"] + scores["adherence"] / 100
            if score > best["score"]:
                best = {"score": score, "step": step, "scores": scores}
                atomic_write(
                    work / "best_ema.safetensors",
                    lambda tmp: save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp)),
                )
                log(f"new best at step {step}")
            t0 = time.time()
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            tensors = {**{k: v.detach() for k, v in trainable.items()}, **{f"ema.{k}": v for k, v in ema.items()}}
            tensors["rng"] = torch.get_rng_state()
            save_checkpoint(
                work, step, tensors, {"optimizer": opt.state_dict()}, {"setup": setup, "best": best}, total_limit=2
            )

    best_ema = load_file(str(work / "best_ema.safetensors"))
    with torch.no_grad():
        for k, v in trainable.items():
            v.copy_(best_ema[k])
    unet.to("cpu").save_motion_modules(args.output_dir)
    if args.domain_lora_rank:  # beside the adapter, as diffusers LoRA weights: pipe.load_lora_weights(output_dir)
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(unet)
        AnimateDiffPipeline.save_lora_weights(args.output_dir, unet_lora_layers=layers, safe_serialization=True)
    model_dir = Path(args.model_output_dir or args.pretrained_model_name_or_path)
    text_encoder.to("cpu").save_pretrained(model_dir / "text_encoder")
    tokenizer.save_pretrained(model_dir / "tokenizer")
    # Paths as given, or relative to this folder when under it: the record says how, not where it was made.
    record = {k: _relative(v) if k.endswith(("_dir", "_path")) else v for k, v in vars(args).items()}
    (Path(args.output_dir) / "training.json").write_text(json.dumps({"args": record, "best": best}, indent=1))
    chosen = {k: round(best["scores"][k], 3) for k in ("motion_followed", "identity", "adherence")}
    log(f"best EMA adapter: step {best['step']} {chosen}; written to {args.output_dir}")


if __name__ == "__main__":
    main()
