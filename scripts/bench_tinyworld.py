"""Benchmarks the bundled `tinyworld` model and its evaluator; writes bench/results/tinyworld.{json,md}.

    python scripts/bench_tinyworld.py [--single 200] [--double 100] [--steps 25]
    python scripts/bench_tinyworld.py --device cuda --dtype float16 --name tinyworld_cuda_fp16  # GPU parity check

- evaluator: per-attribute accuracy on fresh renders (a seed the training never used), named and detail attributes,
  and on the VAE's round trip of the first 1,000 of them (the most any image drawn through this VAE can score);
- model: prompt adherence read by the evaluator, for single- and two-object prompts, each image with its own seed,
  at guidance 5 and at guidance 1 (no CFG); at guidance 5 also the single-object scenes with pattern and outline
  named, and with the background named (reported per background); for the single-object prompts at guidance 5,
  colour per asked colour and size, and what it was read as when wrong;
- `genreg generate`: wall time of one call (load + 25 steps) on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from genreg import load_pipeline
from genreg.cli import DTYPES
from genreg.sd import decode_latents, encode_image
from genreg.tinyworld import BACKGROUNDS, COLORS, SIZES, Evaluator, render_many, sample_scene, scene_prompt

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def evaluator_accuracy(pipe, evaluator: Evaluator, n: int, seed: int, round_trips: int = 1000) -> dict[str, dict]:
    """The evaluator's accuracy on ``n`` fresh renders, and on the VAE's round trip of the first ``round_trips``."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, holdout=False) for _ in range(n)]
    renders = render_many(scenes, processes=2)
    trips = []
    with torch.no_grad():
        for i in range(0, min(n, round_trips), 100):
            latents = encode_image(pipe, [PIL.Image.fromarray(a) for a in renders[i : i + 100]])
            trips += decode_latents(pipe, latents)
    return {
        "renders": evaluator.accuracy(renders, scenes),
        "vae_round_trip": evaluator.accuracy(trips, scenes[: len(trips)]),
    }


def adherence(pipe, evaluator: Evaluator, prompts: list[str], guidance: float, steps: int, seed: int):
    """The evaluator's score of one image per prompt, and the images."""
    images, start = [], time.perf_counter()
    for i in range(0, len(prompts), 50):
        chunk = prompts[i : i + 50]
        generators = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images
    return evaluator.score(images, prompts) | {"seconds": time.perf_counter() - start}, images


def colour_by_size(evaluator: Evaluator, images, scenes) -> dict[str, dict]:
    """Per asked colour and size, over every object, how often the colour is read right at the object's place, the
    wrong readings, and how many of those are the other object's colour (two-object scenes: a binding error)."""
    table: dict[str, dict] = {}
    for reading, scene in zip(evaluator.read(images), scenes, strict=True):
        for obj in scene.objects:
            got = reading.objects.get(obj.position, {}).get("color", "none")
            cell = table.setdefault(obj.color, {}).setdefault(obj.size, {"hits": [], "wrong": {}, "other": 0})
            cell["hits"].append(got == obj.color)
            if got != obj.color:
                cell["wrong"][got] = cell["wrong"].get(got, 0) + 1
                cell["other"] += any(got == o.color for o in scene.objects if o is not obj)
    return {
        colour: {
            size: {
                "accuracy": float(np.mean(c["hits"])),
                "n": len(c["hits"]),
                "wrong": c["wrong"],
                "other": c["other"],
            }
            for size, c in sizes.items()
        }
        for colour, sizes in table.items()
    }


def colour_table(by_size: dict[str, dict]) -> list[str]:
    """colour_by_size as markdown rows: accuracy (n) and the wrong readings, per colour and size."""
    lines = ["| colour | " + " | ".join(SIZES) + " |", "|---|" + "---|" * len(SIZES)]
    for colour in (c for c in COLORS if c in by_size):
        cells = []
        for c in (by_size[colour].get(size) for size in SIZES):
            wrong = ", ".join(f"{k} {v}" for k, v in c["wrong"].items()) if c else ""
            other = f" ({c['other']} the other object's)" if c and c["other"] else ""
            cells.append(f"{c['accuracy']:.3f} ({c['n']}) {wrong}{other}" if c else "-")
        lines.append(f"| {colour} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--single", type=int, default=200)
    p.add_argument("--double", type=int, default=100)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--renders", type=int, default=5000)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--model", default="tinyworld", help="'tinyworld' (bundled) or a diffusers directory")
    p.add_argument(
        "--evaluator", default=None, help="evaluator weights (safetensors) to score with; default: the bundled ones"
    )
    p.add_argument("--device", default="cpu", help="where the model runs (the initial noise is drawn on the CPU)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--results_dir", type=Path, default=RESULTS)
    p.add_argument("--name", default="tinyworld", help="results file stem")
    args = p.parse_args()
    torch.set_num_threads(2)

    evaluator = Evaluator.load(args.evaluator)
    pipe = load_pipeline(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(args.seed)
    scenes = [sample_scene(rng, 1) for _ in range(args.single)]
    single = [scene_prompt(s) for s in scenes]
    # The same single-object scenes with details named, and with the background named (one row per background).
    details = [scene_prompt(s, details=True) for s in scenes]
    by_background = {
        bg: [scene_prompt(s, background=True) for s in scenes if s.background == bg] for bg in BACKGROUNDS
    }
    double_scenes = [sample_scene(rng, 2) for _ in range(args.double)]
    double = [scene_prompt(s) for s in double_scenes]
    rows = [("single@5", single, 5.0), ("double@5", double, 5.0), ("single, details named@5", details, 5.0)]
    rows += [(f"single, {bg} background@5", prompts, 5.0) for bg, prompts in by_background.items()]
    rows += [("single@1", single, 1.0), ("double@1", double, 1.0)]

    on_renders = evaluator_accuracy(pipe, evaluator, args.renders, args.seed + 1)
    results: dict = {"evaluator_on_renders": on_renders["renders"], "vae_round_trip": on_renders["vae_round_trip"]}
    results["model"] = {}
    for key, prompts, guidance in rows:
        r, images = adherence(pipe, evaluator, prompts, guidance, args.steps, seed=args.seed * 1000)
        results["model"][key] = r
        if key in ("single@5", "double@5"):
            by_size = colour_by_size(evaluator, images, scenes if key == "single@5" else double_scenes)
            results[f"{key.split('@')[0]}_colour_by_size"] = by_size
        print(key, json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)

    start = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "genreg.cli",
        "generate",
        "a red circle on the left",
        "a small blue square at the top",
    ]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    check = args.results_dir / "generate_check.png"
    subprocess.run(
        [*cmd, "--model", args.model, "--device", args.device, "--out", str(check)], check=True, capture_output=True
    )
    results["cli_generate_seconds"] = time.perf_counter() - start
    check.unlink()
    results["settings"] = {k: v for k, v in vars(args).items() if k != "results_dir"} | {
        "scheduler": "DDIM (bundled config)",
        "machine": platform.processor() or platform.machine(),
        "threads": 2,
    }

    (args.results_dir / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    ev = results["evaluator_on_renders"]
    model_name = "Bundled model" if args.model == "tinyworld" else f"Model {args.model}"
    lines = [
        "# Tiny World benchmark",
        "",
        f"Command: `python scripts/bench_tinyworld.py --single {args.single} --double {args.double}"
        f" --steps {args.steps}"
        + (f" --model {args.model}" if args.model != "tinyworld" else "")
        + (f" --evaluator {args.evaluator}" if args.evaluator else "")
        + (f" --device {args.device} --dtype {args.dtype}" if args.device != "cpu" else "")
        + "`",
        "",
        f"Model on {args.device} in {args.dtype}.",
        "",
        f"## Evaluator on {args.renders} fresh renders (per-attribute accuracy)",
        "",
        "| " + " | ".join(ev) + " |",
        "|" + "---|" * len(ev),
        "| " + " | ".join(f"{v:.4f}" for v in ev.values()) + " |",
        "",
        f"The first {min(args.renders, 1000)} of them through the VAE (encoded and decoded): the most any drawn image "
        "can score.",
        "",
        "| " + " | ".join(results["vae_round_trip"]) + " |",
        "|" + "---|" * len(results["vae_round_trip"]),
        "| " + " | ".join(f"{v:.4f}" for v in results["vae_round_trip"].values()) + " |",
        "",
        f"## {model_name}, {args.steps} DDIM steps, one seed per image",
        "",
        "Each column reads only what the prompts name: pattern and outline in the details row, the background in the"
        " background rows.",
        "",
        "| prompts | guidance | n | shape | color | size | position | pattern | outline | background | count"
        " | all correct | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    columns = ("shape", "color", "size", "position", "pattern", "outline", "background", "count", "all_correct")
    for key, r in results["model"].items():
        name, guidance = key.split("@")
        cols = " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in columns)
        lines.append(f"| {name} | {guidance} | {r['n']} | {cols} | {r['seconds']:.0f} |")
    for kind, note in (("single", "the single-object images"), ("double", "every object of the two-object images")):
        lines += ["", f"Colour of {note} at guidance 5, per asked colour and size (accuracy, n, wrong readings;"]
        lines += ["a reading that is the other object's colour is a binding error):", ""]
        lines += colour_table(results[f"{kind}_colour_by_size"])
    lines += [
        "",
        f"`genreg generate` with two prompts (load + generate, new process): {results['cli_generate_seconds']:.1f} s",
        "",
    ]
    (args.results_dir / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
