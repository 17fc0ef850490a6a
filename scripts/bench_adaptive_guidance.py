"""Benchmarks Adaptive Guidance and LinearAG against CFG and equal-NFE baselines on the bundled model.

    python scripts/bench_adaptive_guidance.py [--prompts 200] [--seeds 2] [--steps 25]

1. Calibration on its own prompts (a seed the benchmark prompts never use): gamma_t curves under CFG, the AG
   thresholds for --target_nfe budgets, and LinearAG's coefficients.
2. Every row generates the same prompts x seeds: CFG; AG at each threshold; for each AG row, CFG with fewer steps
   and CFG switched off at a fixed step, both at AG's NFE; LinearAG.
Columns: NFE per image, wall time relative to CFG (same run), all-attributes-correct accuracy (evaluator), and
closeness to the CFG image of the same seed (PSNR, evaluator-embedding cosine).
Writes bench/results/adaptive_guidance.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from genreg import load_pipeline
from genreg.guidance import CFG, Conditional, FixedCutoff, Guidance, guided_call, stock_call
from genreg.methods.adaptive_guidance import AdaptiveGuidance, LinearAG, calibrate, gamma_bar_for_nfe, switch_nfe
from genreg.tinyworld import Evaluator, sample_scene, scene_prompt

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def tinyworld_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [scene_prompt(sample_scene(rng, 1 if k % 10 < 7 else 2)) for k in range(n)]


def generate(pipe, policy: Guidance, prompts: list[str], seeds: list[int], steps: int, scale: float, batch: int):
    """Images (uint8 arrays), mean NFE, and seconds spent, for every (prompt, seed)."""
    jobs = [(p, s) for s in seeds for p in prompts]
    images, nfe, seconds = [], [], 0.0
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        generator = [torch.Generator().manual_seed(s * 100003 + i + k) for k, (_, s) in enumerate(chunk)]
        start = time.perf_counter()
        out, n, _ = guided_call(
            stock_call(pipe),
            pipe,
            policy,
            [p for p, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=scale,
            generator=generator,
            output_type="np",
        )
        seconds += time.perf_counter() - start
        images.append((out.images * 255).round().astype(np.uint8))
        nfe += n
    return np.concatenate(images), float(np.mean(nfe)), seconds


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--space", default="x0")
    p.add_argument("--target_nfe", type=float, nargs="+", default=[31, 34, 37])
    p.add_argument("--calibration_prompts", type=int, default=100)
    p.add_argument("--linear_until", type=float, default=0.5)
    p.add_argument("--batch_size", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(2)

    pipe = load_pipeline("tinyworld", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    evaluator = Evaluator.load()

    start = time.perf_counter()
    cal_prompts = tinyworld_prompts(args.calibration_prompts, seed=999)
    gammas, coefficients = calibrate(
        pipe, cal_prompts, args.steps, args.guidance_scale, args.linear_until, seed=999, batch_size=args.batch_size
    )
    calibration = {"seconds": time.perf_counter() - start, "prompts": len(cal_prompts), "space": args.space}
    g = gammas[args.space]
    calibration["gamma_median_per_step"] = torch.quantile(g, 0.5, dim=1).tolist()
    bars = {t: gamma_bar_for_nfe(g, t) for t in args.target_nfe}
    calibration["gamma_bar_for_nfe"] = {
        str(t): {"gamma_bar": b, "calibration_nfe": switch_nfe(g, b).float().mean().item()} for t, b in bars.items()
    }
    print("calibration", json.dumps(calibration["gamma_bar_for_nfe"]), flush=True)

    prompts = tinyworld_prompts(args.prompts, seed=2026)
    seeds = list(range(args.seeds))
    all_prompts = [p for _ in seeds for p in prompts]

    def run(name: str, policy: Guidance, steps: int = args.steps, scale: float = args.guidance_scale) -> dict:
        images, nfe, seconds = generate(pipe, policy, prompts, seeds, steps, scale, args.batch_size)
        score = evaluator.score(images, all_prompts)
        row = {
            "name": name,
            "steps": steps,
            "nfe": nfe,
            "seconds": seconds,
            "all_correct": score["all_correct"],
            "scores": score,
            "images": images,
        }
        print(f"{name}: nfe {nfe:.1f}, {seconds:.0f}s, all_correct {score['all_correct']:.3f}", flush=True)
        return row

    cfg = run("CFG", CFG())
    rows = [cfg]
    for bar in bars.values():
        ag = run(f"AG gamma_bar={bar:.5f}", AdaptiveGuidance(gamma_bar=bar, space=args.space))
        k = int(round(ag["nfe"])) - args.steps  # CFG steps of the fixed cut-off with the same NFE
        fewer = int(round(ag["nfe"] / 2))
        rows += [
            ag,
            run(f"CFG, {fewer} steps (NFE of AG@{bar:.4f})", CFG(), steps=fewer),
            run(f"CFG off after step {k} (NFE of AG@{bar:.4f})", FixedCutoff(k)),
        ]
    rows.append(run("LinearAG", LinearAG(coefficients, linear_until=args.linear_until)))
    rows.append(run("conditional only (guidance 1)", Conditional()))

    ref_emb = evaluator.embed(cfg["images"])
    table = []
    for row in rows:
        emb = evaluator.embed(row["images"])
        table.append(
            {
                "row": row["name"],
                "steps": row["steps"],
                "nfe": row["nfe"],
                "nfe_reduction": 1 - row["nfe"] / cfg["nfe"],
                "time_vs_cfg": row["seconds"] / cfg["seconds"],
                "all_correct": row["all_correct"],
                "psnr_to_cfg": float(np.mean(psnr(row["images"], cfg["images"]))) if row is not cfg else float("inf"),
                "embedding_cosine_to_cfg": float((emb * ref_emb).sum(-1).mean()),
                "scores": row["scores"],
                "seconds": row["seconds"],
            }
        )

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "adaptive_guidance.json").write_text(
        json.dumps({"settings": vars(args), "calibration": calibration, "rows": table}, indent=1)
    )
    lines = [
        "# Adaptive Guidance benchmark",
        "",
        f"Command: `python scripts/bench_adaptive_guidance.py --prompts {args.prompts} --seeds {args.seeds}"
        f" --steps {args.steps}`",
        "",
        f"Bundled `tinyworld` model, {args.prompts} prompts (70% one object, 30% two) x {args.seeds} seeds, "
        f"{args.steps} DDIM steps, guidance scale {args.guidance_scale:g}, AG cosine in {args.space} space, "
        "thresholds calibrated on "
        f"{args.calibration_prompts} other prompts; wall time of whole pipeline calls "
        f"(batch {args.batch_size}, {torch.get_num_threads()} CPU threads).",
        "",
        "| row | NFE | NFE saved | time vs CFG | all correct | PSNR to CFG (dB) | embedding cos to CFG |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['row']} | {r['nfe']:.1f} | {r['nfe_reduction']:.1%} | {r['time_vs_cfg']:.2f} "
            f"| {r['all_correct']:.3f} | {r['psnr_to_cfg']:.1f} | {r['embedding_cosine_to_cfg']:.4f} |"
        )
    lines.append("")
    (RESULTS / "adaptive_guidance.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
