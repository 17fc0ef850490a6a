"""Calibrates Adaptive Guidance and LinearAG for one model and one set of sampling settings.

    python scripts/calibrate_adaptive_guidance.py --model tinyworld --num_prompts 200 --output_dir bench/calibration

Runs plain CFG over a prompt set and writes to --output_dir:
  gamma_curves.json / gamma_curves.png  gamma_t per step (10/50/90th percentile) in the epsilon, x0 and v spaces,
                                        and for each --target_nfe the gamma_bar that spends at most that many NFE;
  linear_ag.json                        LinearAG's per-step least-squares coefficients, with the settings
                                        (scheduler, timesteps, prediction type, guidance scale) they are valid for.
Prompts come from --prompts_file (one per line) or are tiny-world prompts drawn with --seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from genreg import load_pipeline
from genreg.methods.adaptive_guidance import calibrate, gamma_bar_for_nfe, switch_nfe
from genreg.sd import SPACES


def load_prompts(args) -> list[str]:
    if args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"{args.prompts_file} holds no prompts")
        return prompts
    from genreg.tinyworld import sample_scene, scene_prompt

    rng = random.Random(args.seed)
    return [scene_prompt(sample_scene(rng)) for _ in range(args.num_prompts)]


def plot(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    """One panel per space: the 10th, 50th and 90th percentile of gamma_t against the step index."""
    w, h, pad = 360, 240, 36
    img = Image.new("RGB", (w * len(curves), h), "white")
    draw = ImageDraw.Draw(img)
    colors = {"p10": (120, 160, 230), "p50": (20, 40, 160), "p90": (120, 160, 230)}
    for k, (space, c) in enumerate(curves.items()):
        x0 = k * w
        lo = min(min(c["p10"]), 0.9)
        n = len(c["p50"])

        def xy(i, v, x0=x0, n=n, lo=lo):
            return x0 + pad + (w - 2 * pad) * i / max(1, n - 1), h - pad - (h - 2 * pad) * (v - lo) / (1 - lo)

        draw.rectangle((x0 + pad, pad, x0 + w - pad, h - pad), outline=(0, 0, 0))
        for name, color in colors.items():
            draw.line([xy(i, v) for i, v in enumerate(c[name])], fill=color, width=2)
        draw.text((x0 + pad, 8), f"gamma_t in {space} space (p10/p50/p90)", fill=(0, 0, 0))
        draw.text((x0 + 2, pad - 6), "1.0", fill=(0, 0, 0))
        draw.text((x0 + 2, h - pad - 6), f"{lo:.2f}", fill=(0, 0, 0))
        draw.text((x0 + w // 2 - 20, h - pad + 8), f"step 0..{n - 1}", fill=(0, 0, 0))
    img.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tinyworld")
    p.add_argument("--prompts_file", default=None)
    p.add_argument("--num_prompts", type=int, default=200)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument(
        "--target_nfe", type=float, nargs="+", default=[30, 34, 38], help="NFE budgets to find gamma_bar for"
    )
    p.add_argument("--min_cfg_steps", type=int, default=1)
    p.add_argument("--linear_until", type=float, default=0.5)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="bench/calibration")
    args = p.parse_args()

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = load_prompts(args)
    gammas, coefficients = calibrate(
        pipe, prompts, args.num_inference_steps, args.guidance_scale, args.linear_until, args.seed, args.batch_size
    )

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"settings": vars(args), "cfg_nfe": 2 * args.num_inference_steps, "spaces": {}}
    curves = {}
    for space in SPACES:
        g = gammas[space]  # (steps, prompts)
        q = torch.quantile(g, torch.tensor([0.1, 0.5, 0.9]), dim=1)
        curves[space] = {"p10": q[0].tolist(), "p50": q[1].tolist(), "p90": q[2].tolist()}
        thresholds = {}
        for target in args.target_nfe:
            bar = gamma_bar_for_nfe(g, target, args.min_cfg_steps)
            thresholds[str(target)] = {
                "gamma_bar": bar,
                "mean_nfe": switch_nfe(g, bar, args.min_cfg_steps).float().mean().item(),
            }
        report["spaces"][space] = {"curve": curves[space], "gamma_bar_for_nfe": thresholds}
    (out / "gamma_curves.json").write_text(json.dumps(report, indent=1))
    plot(curves, out / "gamma_curves.png")
    coefficients.save(out / "linear_ag.json")
    for space in SPACES:
        print(space, json.dumps(report["spaces"][space]["gamma_bar_for_nfe"]))
    print(f"wrote {out / 'gamma_curves.json'}, {out / 'gamma_curves.png'} and {out / 'linear_ag.json'}")


if __name__ == "__main__":
    main()
