"""Tiny World video benchmark: the bundled text-to-video model (AnimateDiff over the bundled image model) scored frame
by frame against its prompts, beside rendered clips of the same prompts (the evaluator's ceiling); FreeNoise
(diffusers' long-video option) on the same model for clips longer than it was trained on.

    python scripts/bench_tinyworld_video.py                 # 60 clips of 16 frames, 18 of 48 with FreeNoise

Writes bench/results/tinyworld_video.{json,md} and an example sheet bench/results/tinyworld_video.png.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genreg.tinyworld.video import MOTIONS, clip_prompt, render_clip, sample_clip
from genreg.tinyworld.video_eval import VideoEvaluator, summarize
from genreg.video import generate_video, load_video_pipeline

COLUMNS = ("motion_followed", "identity", "adherence", "similarity", "smooth", "jumps", "step_px")


def generate(pipe, prompts: list[str], num_frames: int, steps: int, guidance: float) -> tuple[list[np.ndarray], float]:
    start, videos = time.perf_counter(), []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(i)
        out = generate_video(
            pipe,
            prompt,
            num_frames=num_frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="np",
        )
        videos.append(out.frames[0])
    return videos, (time.perf_counter() - start) / len(prompts)


def row(evaluator: VideoEvaluator, name: str, videos, prompts, truth, seconds: float | None, clips) -> dict:
    per_clip = [evaluator.score_clip(v, p) for v, p in zip(videos, prompts, strict=True)]
    motions = [c.motion for c in clips]
    per_motion = {
        m: float(np.mean([r["motion_followed"] for r, k in zip(per_clip, motions, strict=True) if k == m]))
        for m in MOTIONS
    }
    scores = summarize(per_clip)
    fd = evaluator.frechet(videos, truth) if len(videos) > 2 else float("nan")
    return {"row": name, **scores, "frechet": fd, "seconds_per_clip": seconds, "per_motion": per_motion}


def sheet(rows: list[tuple[str, list[np.ndarray]]], path: Path, frames: int = 8) -> None:
    """One line of ``frames`` evenly spaced frames per (label, clip)."""
    lines = []
    for _, clip in rows:
        idx = np.linspace(0, len(clip) - 1, frames).round().astype(int)
        pics = [
            np.asarray(clip[i] if clip.dtype == np.uint8 else (clip[i] * 255).round().astype(np.uint8)) for i in idx
        ]
        lines.append(np.concatenate(pics, axis=1))
    Image.fromarray(np.concatenate(lines, axis=0)).resize((frames * 128, len(lines) * 128), Image.NEAREST).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=60, help="16-frame clips, spread evenly over the motions")
    p.add_argument("--long_clips", type=int, default=18, help="48-frame clips with FreeNoise (0: skip)")
    p.add_argument("--long_frames", type=int, default=48)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--model", default="tinyworld", help="the image model (its text encoder knows the motion words)")
    p.add_argument("--motion_adapter", default="tinyworld")
    p.add_argument("--out", default="bench/results/tinyworld_video")
    args = p.parse_args()
    command = "python scripts/bench_tinyworld_video.py " + " ".join(sys.argv[1:])

    rng = random.Random(2024)
    clips = [sample_clip(rng, motion=MOTIONS[i % len(MOTIONS)]) for i in range(args.clips)]
    prompts = [clip_prompt(c) for c in clips]
    evaluator = VideoEvaluator.load()
    pipe = load_video_pipeline(args.model, args.motion_adapter, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    truth = [render_clip(c) for c in clips]
    rows = [row(evaluator, "rendered clips (ceiling)", truth, prompts, truth, None, clips)]
    videos, seconds = generate(pipe, prompts, 16, args.steps, args.guidance_scale)
    rows.append(row(evaluator, "AnimateDiff, 16 frames", videos, prompts, truth, seconds, clips))
    print(json.dumps(rows[-1]), flush=True)
    examples = [(p, v) for p, v in zip(prompts[:6], videos[:6], strict=True)]

    if args.long_clips:
        long_clips = clips[: args.long_clips]
        long_prompts = prompts[: args.long_clips]
        long_truth = [render_clip(c, args.long_frames) for c in long_clips]
        rows.append(
            row(
                evaluator,
                f"rendered clips, {args.long_frames} frames (ceiling)",
                long_truth,
                long_prompts,
                long_truth,
                None,
                long_clips,
            )
        )
        videos, seconds = generate(pipe, long_prompts, args.long_frames, args.steps, args.guidance_scale)
        rows.append(
            row(
                evaluator,
                f"FreeNoise, {args.long_frames} frames",
                videos,
                long_prompts,
                long_truth,
                seconds,
                long_clips,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        examples += [(p, v) for p, v in zip(long_prompts[:3], videos[:3], strict=True)]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet(examples, out.with_suffix(".png"))
    setup = {
        "command": command,
        "clips": args.clips,
        "long_clips": args.long_clips,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "example_prompts": [p for p, _ in examples],
    }
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    lines = [
        "# Tiny World video benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Bundled image model + bundled motion adapter (stock `AnimateDiffPipeline`), {args.steps} DDIM steps, "
        f"guidance "
        f"{args.guidance_scale}, one seed per clip, CPU float32. Prompts spread evenly over the motions "
        f"({', '.join(MOTIONS)}); the rendered rows are the same prompts drawn by the renderer, read by the same "
        "per-frame evaluator (its ceiling). Targets: motion followed >= 0.80, identity >= 0.90.",
        "",
        "| row | n | " + " | ".join(COLUMNS) + " | Frechet to rendered | s/clip |",
        "|---|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for r in rows:
        cells = [f"{r[c]:.3f}" for c in COLUMNS]
        seconds = "-" if r["seconds_per_clip"] is None else f"{r['seconds_per_clip']:.1f}"
        fd = max(r["frechet"], 0.0)  # a set against itself can come out a hair below zero
        lines.append(f"| {r['row']} | {r['n']} | " + " | ".join(cells) + f" | {fd:.2f} | {seconds} |")
    lines += [
        "",
        "Motion followed, per motion:",
        "",
        "| row | " + " | ".join(MOTIONS) + " |",
        "|---|" + "---|" * len(MOTIONS),
    ]
    for r in rows:
        lines.append(f"| {r['row']} | " + " | ".join(f"{r['per_motion'][m]:.2f}" for m in MOTIONS) + " |")
    lines += [
        "",
        f"Examples (`{out.with_suffix('.png').name}`, eight frames a line): "
        + "; ".join(f'"{p}"' for p, _ in examples),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
