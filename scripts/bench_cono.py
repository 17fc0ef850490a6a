"""CoNo benchmark on the Tiny World's text-to-video model: long single-prompt and 3-prompt videos, against independent
clips concatenated and FreeNoise, with the ablations (no look-back, no regularization, no internal stage).

    python scripts/bench_cono.py                  # 6 single-prompt and 6 three-prompt videos of 56 frames

Every row draws the same prompts with the same seed and length; the segments (which frames each prompt owns) are
CoNo's. Per video, at each clip boundary of the row (where one drawn clip meets the next: CoNo's stage joins, the
independent clips' joins, FreeNoise's prompt switches or every 16 frames), the per-frame evaluator reads the objects on
both sides, paired by place: ``boundary_identity`` (as many objects, each the same shape and, but for turning,
colour), ``boundary_similarity`` (embedding cosine) and ``boundary_jump`` (an object appears or goes, or steps more
than 6 px there, the clip's own step being 2.3 px). Each segment is scored
against its prompt (``adherence``, ``motion_followed``). Writes bench/results/cono.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from genreg.pipelines import CoNoPipeline

from genreg.methods.cono import CoNoSettings, video_plan
from genreg.profiling import peak_rss_mib, reset_peak_rss, rss_mib
from genreg.tinyworld.video import MOTIONS, Clip, clip_prompt, sample_clip
from genreg.tinyworld.video_eval import JUMP_PX, VideoEvaluator
from genreg.tinyworld.world import Scene
from genreg.video import generate_video, load_video_pipeline

ROWS = {
    "independent clips": None,
    "FreeNoise": None,
    "CoNo": {},
    "CoNo without look-back": {"look_back": 0.0},
    "CoNo without regularization": {"consistency_scale": 0.0},
    "CoNo without internal stage": {"internal_stage": False},
}
OPPOSITE = {"right": "left", "left": "right", "down": "up", "up": "down"}


def sequences(n_single: int, n_multi: int, seed: int) -> list[list[str]]:
    """Single prompts (one per motion in turn), and 3-prompt sequences that continue where the last clip ended:
    a translation and back again, or a colour turning twice."""
    rng = random.Random(seed)
    out = [[clip_prompt(sample_clip(rng, MOTIONS[i % len(MOTIONS)]))] for i in range(n_single)]
    for i in range(n_multi):
        if i % 3 == 2:
            first = sample_clip(rng, "turning")
            obj = first.scene.objects[0]
            third = rng.choice([c for c in ("red", "blue", "yellow", "green") if c not in (obj.color, first.to_color)])
            colors = [obj.color, first.to_color, third, obj.color]
            steps = [
                Clip(Scene((replace(obj, color=a),), first.scene.background), "turning", b)
                for a, b in zip(colors, colors[1:], strict=False)
            ]
        else:
            motion = ("right", "down")[i % 2]
            first = sample_clip(rng, motion)
            steps = [Clip(first.scene, m) for m in (motion, OPPOSITE[motion], motion)]
        out.append([clip_prompt(c) for c in steps])
    return out


def draw_row(name, pipe, cono, prompts, owner, args) -> tuple[np.ndarray, list[int], float, list[int]]:
    """(frames, clip boundaries, seconds, prompt of each frame) of one row; ``owner``: CoNo's prompt of each frame,
    which the baselines follow."""
    gen = lambda k=0: torch.Generator().manual_seed(args.seed + k)  # noqa: E731
    common = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale, "output_type": "np"}
    start = time.perf_counter()
    n = len(owner)
    starts = [owner.index(k) for k in range(len(prompts))]
    if name == "independent clips":
        clips, bounds = [], []
        for k, prompt in enumerate(prompts):
            length = owner.count(k)
            for j in range(-(-length // 16)):
                bounds.append(sum(len(c) for c in clips))
                clip = pipe(prompt, num_frames=16, generator=gen(100 * k + j), **common).frames[0]
                clips.append(clip[: length - 16 * j])
        return np.concatenate(clips), bounds[1:], time.perf_counter() - start, owner
    if name == "FreeNoise":
        prompt = prompts[0] if len(prompts) == 1 else dict(zip(starts, prompts, strict=True))
        frames = generate_video(pipe, prompt, num_frames=n, generator=gen(), **common).frames[0]
        bounds = starts[1:] if len(prompts) > 1 else list(range(16, n, 16))
        return frames, bounds, time.perf_counter() - start, owner
    out = cono(prompts, num_frames=n, generator=gen(), **ROWS[name], **common)
    return out.frames[0], out.clip_starts, time.perf_counter() - start, out.prompt_of_frame


def matched(before: list, after: list) -> list[tuple]:
    """The objects of two frames paired by nearest centroid (each used once); None where the counts differ."""
    pairs, left = [], list(after)
    for a in before:
        if not left:
            return None
        c = min(left, key=lambda o: np.hypot(a.x - o.x, a.y - o.y))
        left.remove(c)
        pairs.append((a, c))
    return None if left or not pairs else pairs


def score(evaluator: VideoEvaluator, frames, bounds, prompts, owner) -> dict:
    """Boundary scores read every object on both sides, paired by place (a frame may hold two)."""
    objs = evaluator.objects(frames)
    same, sims, jumps = [], [], []
    for b in bounds:
        pairs = matched(objs[b - 1], objs[b])
        turning = "turning" in prompts[owner[b]]
        keys = ("shape",) if turning else ("shape", "color")
        same.append(pairs is not None and all(a.reading.get(k) == c.reading.get(k) for a, c in pairs for k in keys))
        sims.append(float(np.mean([float(a.embedding @ c.embedding) for a, c in pairs])) if pairs else 0.0)
        jumps.append(pairs is None or any(np.hypot(a.x - c.x, a.y - c.y) > JUMP_PX for a, c in pairs))
    segments = [
        evaluator.score_clip(frames[[i for i, k in enumerate(owner) if k == p]], prompt)
        for p, prompt in enumerate(prompts)
    ]
    steps = [
        np.hypot(a.x - c.x, a.y - c.y) for f in range(len(objs) - 1) for a, c in (matched(objs[f], objs[f + 1]) or [])
    ]
    return {
        "boundary_identity": float(np.mean(same)),
        "boundary_similarity": float(np.mean(sims)),
        "boundary_jump": float(np.mean(jumps)),
        "jumps": float(sum(s > JUMP_PX for s in steps)),
        "adherence": float(np.mean([s["adherence"] for s in segments])),
        "motion_followed": float(np.mean([s["motion_followed"] for s in segments])),
        "identity": float(np.mean([s["identity"] for s in segments])),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--single", type=int, default=6)
    p.add_argument("--multi", type=int, default=6)
    p.add_argument("--num_frames", type=int, default=56)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--model", default="tinyworld", help="the image model (its text encoder knows the motion words)")
    p.add_argument("--motion_adapter", default="tinyworld")
    p.add_argument("--out", default="bench/results/cono")
    args = p.parse_args()
    command = "python scripts/bench_cono.py " + " ".join(sys.argv[1:])
    evaluator = VideoEvaluator.load()
    pipe = load_video_pipeline(args.model, args.motion_adapter, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cono = CoNoPipeline.from_pipe(pipe)
    results = {name: {"single": [], "multi": [], "seconds": [], "peak_mib": []} for name in args.rows}
    for prompts in sequences(args.single, args.multi, args.seed):
        owner = video_plan(len(prompts), args.num_frames, 16, CoNoSettings().guided_frames, True)[1]
        for name in args.rows:
            reset_peak_rss()
            base = rss_mib()
            frames, bounds, seconds, own = draw_row(name, pipe, cono, prompts, owner, args)
            results[name]["peak_mib"].append(peak_rss_mib() - base)
            results[name]["seconds"].append(seconds)
            results[name]["single" if len(prompts) == 1 else "multi"].append(
                score(evaluator, frames, bounds, prompts, own)
            )
            print(
                json.dumps(
                    {"row": name, "prompts": prompts, **results[name]["single" if len(prompts) == 1 else "multi"][-1]}
                ),
                flush=True,
            )
    write(args, results, command)


def write(args, results: dict, command: str) -> None:
    keys = (
        "boundary_identity",
        "boundary_similarity",
        "boundary_jump",
        "jumps",
        "adherence",
        "motion_followed",
        "identity",
    )
    rows = []
    for name, r in results.items():
        for kind in ("single", "multi"):
            if r[kind]:
                means = {k: float(np.mean([s[k] for s in r[kind]])) for k in keys}
                rows.append(
                    {
                        "row": name,
                        "videos": kind,
                        "n": len(r[kind]),
                        **means,
                        "seconds_per_video": float(np.mean(r["seconds"])),
                        "seconds_per_second": float(np.mean(r["seconds"])) / (args.num_frames / 8),
                        "peak_mib": float(np.median(r["peak_mib"])),
                    }
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "raw": results}, indent=1))
    lines = [
        "# CoNo benchmark (Tiny World video)",
        "",
        f"Command: `{command}`",
        "",
        f"{args.num_frames}-frame videos, {args.steps} DDIM steps, guidance {args.guidance_scale}, seed {args.seed}, "
        "CPU float32; single: one prompt; multi: three prompts that continue where the last ended (a translation, "
        "back, and again; a colour turning twice). Boundary columns are read at each row's own clip joins (see the "
        "script); `s per video second` is wall time per second of video at 8 fps; peak MiB is the resident-memory "
        "rise, median.",
        "",
        "| row | videos | n | boundary identity | boundary similarity | boundary jump | jumps/video | adherence "
        "| motion followed | identity | s/video | s per video second | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['videos']} | {r['n']} | {r['boundary_identity']:.3f} | "
            f"{r['boundary_similarity']:.3f} | {r['boundary_jump']:.3f} | {r['jumps']:.2f} | {r['adherence']:.3f} | "
            f"{r['motion_followed']:.3f} | {r['identity']:.3f} | {r['seconds_per_video']:.1f} | "
            f"{r['seconds_per_second']:.1f} | {r['peak_mib']:.0f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
