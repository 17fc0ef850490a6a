"""Benchmarks Score Forgetting Distillation on the bundled model: forget a tiny-world concept into a one-step model.

    python scripts/bench_sfd.py [--forget star --override circle] [--steps 400]

Rows, same prompts and seeds: the teacher (25 DDIM steps, CFG 5); the same distillation without the forget branch
(plain SiD: --forget_weight 0); SFD; SFD started from that SiD generator (``sfd-two-stage``, listed after ``sid``,
--steps more steps: the official SD run starts the generator from a distilled SiD one, as the DDPM code's
SFD-Two-Stage does); and a fine-tuning unlearning baseline that keeps the multi-step sampler (ESD, Gandikota et al.
2023: the UNet under the forget prompt is trained towards eps(x_t) - eta (eps(x_t, c_f) - eps(x_t)) of the frozen
model, x_t on the frozen model's own samples of the forget prompt; full UNet, eta 1).
Columns: forget rate (how often the evaluator reads the forgotten value where a prompt names it, and what it reads
instead), the same over paraphrases ("an image of ...", the concept named beside its pattern and outline),
retained all-correct on prompts that never name it (against the teacher), images per second at one batch, and
training time, steps and peak memory. Beside the teacher, the VAE's decoding alone (the same batches, to PIL as the
pipelines return them): every one-step generator decodes too, so the teacher's time over the decoding time bounds
the speed-up any of them can reach on this model and machine. Writes bench/results/<--name, default sfd>.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from genreg.pipelines import OneStepPipeline

from genreg import load_pipeline
from genreg.methods.score_forgetting import SFDConfig, tinyworld_prompts, train_sfd
from genreg.profiling import peak_rss_mib, reset_peak_rss, rss_mib
from genreg.sd import decode_latents
from genreg.tinyworld import Evaluator
from genreg.tinyworld.world import OBJECT_ATTRIBUTES, sample_scene, scene_prompt
from genreg.training import TrainConfig, fit

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
ROWS = ("teacher", "sid", "sfd", "sfd-two-stage", "esd")


def fresh(model: str):
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, prompts: list[str], seed: int, one_step: bool) -> tuple[list, float]:
    """Images for ``prompts`` (image k from seed + k) and the images per second of drawing them."""
    images, start = [], time.perf_counter()
    for i in range(0, len(prompts), 50):
        chunk = prompts[i : i + 50]
        generators = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        kwargs = {} if one_step else {"num_inference_steps": 25, "guidance_scale": 5.0}
        images += pipe(chunk, generator=generators, **kwargs).images
    return images, len(prompts) / (time.perf_counter() - start)


@torch.no_grad()
def decoding_speed(pipe, n: int, seed: int) -> float:
    """Images per second of the VAE's decoding alone, in the batches ``draw`` uses (random latents of the model's
    shape, decoded to PIL images)."""
    g = torch.Generator().manual_seed(seed)
    shape = (pipe.vae.config.latent_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    start = time.perf_counter()
    for i in range(0, n, 50):
        decode_latents(pipe, torch.randn((min(50, n - i), *shape), generator=g))
    return n / (time.perf_counter() - start)


def read_concept(evaluator: Evaluator, images, attribute: str, concept: str) -> tuple[float, dict]:
    """The share of objects read with ``concept``, and what the objects' ``attribute`` reads as."""
    values = [obj[attribute] for reading in evaluator.read(images) for obj in reading.objects.values()]
    counts = collections.Counter(values)
    return counts[concept] / max(1, len(values)), dict(counts.most_common(4))


class ESDObjective(torch.nn.Module):
    """ESD's loss: ||eps_theta(x_t, c_f) - (eps*(x_t) - eta (eps*(x_t, c_f) - eps*(x_t)))||^2, eps* frozen."""

    def __init__(self, pipe, eta: float = 1.0):
        super().__init__()
        self.pipe, self.eta = pipe, eta
        self.frozen = copy.deepcopy(pipe.unet).requires_grad_(False)
        self.unet = pipe.unet.requires_grad_(True)
        pipe.text_encoder.requires_grad_(False)
        pipe.vae.requires_grad_(False)

    def forward(self, batch: dict) -> torch.Tensor:
        pipe, scheduler = self.pipe, self.pipe.scheduler
        with torch.no_grad():
            cond = pipe.text_encoder(batch["input_ids"])[0]
            uncond = pipe.text_encoder(batch["uncond_ids"])[0]
            g = torch.Generator().manual_seed(int(batch["seed"][0]))
            x0 = pipe(
                prompt_embeds=cond, num_inference_steps=10, guidance_scale=5.0, generator=g, output_type="latent"
            ).images
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g)
            x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=g), t)
            e_u, e_c = (self.frozen(x_t, t, c).sample for c in (uncond, cond))
            target = e_u - self.eta * (e_c - e_u)
        return torch.nn.functional.mse_loss(self.unet(x_t, t, cond).sample, target)


def train_esd(args, forget: list[str], out: Path):
    pipe = fresh(args.model)

    def ids(text: str) -> torch.Tensor:
        tokens = pipe.tokenizer(
            text, padding="max_length", truncation=True, max_length=pipe.tokenizer.model_max_length
        )
        return torch.tensor(tokens.input_ids)

    def sample(step: int, index: int) -> dict:
        rng = random.Random(f"{args.seed}-{step}-{index}")
        return {"input_ids": ids(rng.choice(forget)), "uncond_ids": ids(""), "seed": rng.randrange(2**62)}

    train = TrainConfig(
        output_dir=str(out),
        max_train_steps=args.esd_steps,
        train_batch_size=args.batch_size,
        learning_rate=args.esd_lr,
        checkpointing_steps=0,
        report_to="none",
        seed=args.seed,
    )
    fit(ESDObjective(pipe), sample, train)
    pipe.unet.requires_grad_(False)
    return pipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tinyworld")
    p.add_argument("--forget", default="star")
    p.add_argument("--override", default="circle")
    p.add_argument("--steps", type=int, default=400, help="distillation steps (SiD and SFD)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--esd_steps", type=int, default=300)
    p.add_argument("--esd_lr", type=float, default=1e-5)
    p.add_argument("--prompts", type=int, default=100, help="prompts per set (forget, paraphrase, retain)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=["teacher", "sid", "sfd", "esd"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", default="runs/bench_sfd")
    p.add_argument("--name", default="sfd", help="results file stem: bench/results/<name>.{json,md}")
    args = p.parse_args()
    if "sfd-two-stage" in args.rows and "sid" not in args.rows[: args.rows.index("sfd-two-stage")]:
        p.error("the sfd-two-stage row starts from the sid row's generator: list sid before it")

    attribute = next(a for a, values in OBJECT_ATTRIBUTES.items() if args.forget in values)
    rng = random.Random(f"bench-sfd-{args.seed}")
    forget = tinyworld_prompts(args.forget, True, n=args.prompts, seed=args.seed + 1)
    paraphrase = [f"an image of {p}" for p in forget[: args.prompts // 2]]
    paraphrase += [p.replace(args.forget, f"striped {args.forget}", 1) for p in forget[args.prompts // 2 :]]
    retain = []
    while len(retain) < args.prompts:
        scene = sample_scene(rng, n_objects=1)
        if all(getattr(o, attribute) != args.forget for o in scene.objects):
            retain.append(scene_prompt(scene, background=True))
    evaluator, work, rows = Evaluator.load(), Path(args.work_dir), {}
    for name in args.rows:
        shutil.rmtree(work / name, ignore_errors=True)  # a fresh run: an earlier benchmark's row is removed
        reset_peak_rss()  # each row's own peak, though the rows share this process
        start, before = time.perf_counter(), rss_mib()
        if name == "teacher":
            pipe, one_step, steps = fresh(args.model), False, 0
        elif name in ("sid", "sfd", "sfd-two-stage"):
            config = SFDConfig(forget=args.forget, override=args.override, forget_weight=0.0 if name == "sid" else 1.0)
            if name == "sfd-two-stage":
                config.generator_init = str(work / "sid" / "generator")
            train = TrainConfig(
                output_dir=str(work / name),
                max_train_steps=args.steps,
                train_batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                checkpointing_steps=0,
                report_to="none",
                seed=args.seed,
            )
            pipe = OneStepPipeline.from_pretrained(train_sfd(fresh(args.model), config, train))
            pipe.set_progress_bar_config(disable=True)
            one_step, steps = True, args.steps if name != "sfd-two-stage" else f"{args.steps} after sid's"
        else:
            pipe, one_step, steps = train_esd(args, forget, work / name), False, args.esd_steps
        trained = time.perf_counter() - start
        peak = peak_rss_mib()
        images, speed = draw(pipe, forget, args.seed, one_step)
        rate, instead = read_concept(evaluator, images, attribute, args.forget)
        para_rate, _ = read_concept(evaluator, draw(pipe, paraphrase, args.seed, one_step)[0], attribute, args.forget)
        kept = evaluator.score(draw(pipe, retain, args.seed + 1, one_step)[0], retain)["all_correct"]
        rows[name] = {
            "forget_rate": rate,
            "reads_instead": instead,
            "paraphrase_forget_rate": para_rate,
            "retained_all_correct": kept,
            "images_per_second": speed,
            "training_seconds": trained,
            "training_steps": steps,
            "peak_rss_mib_growth": peak - before,
        }
        if name == "teacher":
            rows[name]["decoding_images_per_second"] = decoding_speed(pipe, len(forget), args.seed)
        print(name, rows[name], flush=True)
    write_results(args, rows)


def write_results(args, rows: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    teacher = rows.get("teacher", {})
    lines = [
        f"# Score Forgetting Distillation: forget {args.forget!r} (override {args.override!r})",
        "",
        f"`python scripts/bench_sfd.py {' '.join(sys.argv[1:])}`; {args.prompts} prompts per set; teacher and ESD "
        "at 25 DDIM steps, CFG 5; SiD and SFD in one step.",
        "",
        "| row | forget rate | reads instead | paraphrases | retained all-correct | images/s | speed vs teacher | "
        "training s (steps) | peak RSS growth MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ratio = r["images_per_second"] / teacher["images_per_second"] if teacher else float("nan")
        lines.append(
            f"| {name} | {r['forget_rate']:.3f} | {r['reads_instead']} | {r['paraphrase_forget_rate']:.3f} | "
            f"{r['retained_all_correct']:.3f} | {r['images_per_second']:.1f} | {ratio:.1f}x | "
            f"{r['training_seconds']:.0f} ({r['training_steps']}) | {r['peak_rss_mib_growth']:.0f} |"
        )
    if "decoding_images_per_second" in teacher:
        decoding = teacher["decoding_images_per_second"]
        lines += [
            "",
            f"The VAE's decoding alone (the same batches): {decoding:.1f} images/s, so no one-step generator can be "
            f"more than {decoding / teacher['images_per_second']:.1f}x faster than the teacher here.",
        ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
