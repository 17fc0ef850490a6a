"""Probes where HiFi Tuner's reference-guided generation (Algorithm 2) loses the subject on the bundled model: it reads
the subject's identity at each stage of what the guidance pastes, before any null-text optimization.

    python scripts/probe_reference_guidance.py [--work_dir runs/bench_hifi_tuner] [--subjects all] [--full]

For the benchmark's regularized step-wise subjects (``bench_hifi_tuner.py``'s "+ reg" runs in --work_dir) and its
evaluation cases and seeds, each image is scored at these stages:
- first draw: the step-wise subject's own image (Eq. 7), the draw Algorithm 2 starts from;
- reference pasted in pixels: the closest kit image, moved onto the first draw's subject by Algorithm 4's transform,
  pasted into the first draw inside its moved mask (soft at the edge): the best the guidance could carry over;
- pasted, VAE round trip: that composite encoded and decoded;
- pasted latents at t_s, no optimization: Algorithm 2 with J = 0 (the inverted reference written into the mask at
  t_s, then the subject's sampling);
- Algorithm 2 in full (with --full; as the benchmark's "+ reference-guided generation" row);
- Algorithm 2 with other settings (``--variants NAME='{"learning_rate": 0.1}'``: ``ReferenceGuidance`` fields).
Also the aligned mask's IoU with the first draw's subject mask, and for each run of Algorithm 2 the window: per guided
step, the squared distance of the written masked latents to the inverted reference's, relative to the latter's squared
norm (0: on the reference's path; about 2: unrelated). Writes bench/results/<--name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import bench_hifi_tuner as bench  # this folder's benchmark: its kits, runs, cases and seeds
import numpy as np
import PIL.Image
import torch

from genreg.methods.hifi_tuner import SUBJECT_FILE, HiFiSubject, ReferenceGuidance, reference_guided
from genreg.methods.hifi_tuner.reference import aligned_reference
from genreg.sd import decode_latents, encode_image
from genreg.tinyworld import Evaluator, render
from genreg.tinyworld.subjects import SUBJECTS, evaluation_cases, object_mask, reference_scenes, score_subject

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
STAGES = {
    "first": "first draw (step-wise subject)",
    "pasted": "reference pasted in pixels",
    "vae": "pasted, VAE round trip",
    "no_optimization": "pasted latents at t_s, J = 0",
    "full": "Algorithm 2 in full",
}


def composite(first: PIL.Image.Image, moved: PIL.Image.Image, weights: np.ndarray) -> PIL.Image.Image:
    w = weights.clip(0, 1)[..., None]
    pixels = np.asarray(first, np.float32) * (1 - w) + np.asarray(moved, np.float32) * w
    return PIL.Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def guided(pipe, hifi, case, references, evaluator, seed: int, settings: ReferenceGuidance):
    """Algorithm 2 for one benchmark image (its prompt, its seed, the object at the prompt's place as the mask)."""
    where = case.scene.objects[0].position
    return reference_guided(
        pipe,
        hifi,
        case.prompt(hifi.subject_word),
        references,
        lambda image: object_mask(image, where),
        evaluator.embed,
        guidance_scale=bench.SAMPLING["guidance_scale"],
        num_inference_steps=bench.SAMPLING["num_inference_steps"],
        generator=torch.Generator().manual_seed(seed),
        settings=settings,
    )


def probe_subject(args, pipe, evaluator, subject) -> dict:
    out = Path(args.work_dir) / "reg" / subject.name / f"seed{args.seed}"
    if not (out / SUBJECT_FILE).exists():
        raise SystemExit(f"{out} holds no trained subject: run scripts/bench_hifi_tuner.py --work_dir {args.work_dir}")
    hifi = HiFiSubject.load(out)
    references = bench.kit_references(Path(args.work_dir) / "kits" / subject.name, hifi.subject_word)
    cases = evaluation_cases(subject)
    settings = ReferenceGuidance()
    runs = ({"full": settings} if args.full else {}) | {name: replace(settings, **kw) for name, kw in args.variants}
    images: dict[str, list] = {stage: [] for stage in STAGES if stage != "full"} | {name: [] for name in runs}
    windows: dict[str, list] = {name: [] for name in runs}
    ious = []
    for r in range(args.images_per_case):
        for c, case in enumerate(cases):
            seed = args.seed * 10_000 + r * len(cases) + c  # the benchmark's seed for this image
            image, info = guided(pipe, hifi, case, references, evaluator, seed, replace(settings, inner_steps=0))
            first = info["first"]
            images["first"].append(first)
            if "skipped" in info:  # nothing to paste: every stage is the first draw
                for stage in images:
                    if stage != "first":
                        images[stage].append(first)
                ious.append(0.0)
                continue
            target = object_mask(first, case.scene.objects[0].position)
            moved, weights = aligned_reference(references[info["reference"]], target, settings)
            pasted = composite(first, moved, weights)
            images["pasted"].append(pasted)
            images["vae"].append(decode_latents(pipe, encode_image(pipe, pasted))[0])
            images["no_optimization"].append(image)
            for name, run in runs.items():
                image, info = guided(pipe, hifi, case, references, evaluator, seed, run)
                images[name].append(image)
                windows[name].append(info["window_error"])
            aligned = weights > 0.5
            ious.append(float((aligned & target).sum() / max((aligned | target).sum(), 1)))
    refs = [render(s)[0] for s in reference_scenes(subject)]
    scores = {stage: score_subject(evaluator, imgs, cases, subject, refs) for stage, imgs in images.items()}
    window = {name: np.mean(errors, axis=0).tolist() for name, errors in windows.items() if errors}
    n = len(images["first"])
    return {"subject": subject.name, "images": n, "mask_iou": float(np.mean(ious)), "window_error": window} | scores


def write_results(args, rows: list[dict]) -> None:
    stages = [s for s in STAGES if s in rows[0]] + [name for name, _ in args.variants]
    label = STAGES | {name: f"Algorithm 2, {json.dumps(kw)}" for name, kw in args.variants}
    n = sum(r["images"] for r in rows)

    def mean(stage: str, metric: str) -> float:
        return sum(r[stage][metric] * r["images"] for r in rows) / n

    command = shlex.join(["python", "scripts/probe_reference_guidance.py", *sys.argv[1:]])
    iou = sum(r["mask_iou"] * r["images"] for r in rows) / n
    lines = [
        "# HiFi Tuner reference-guided generation: where the subject is lost",
        "",
        f"`{command}`; {len(rows)} subjects, {n} images a row (the benchmark's cases and seeds, its regularized "
        f"step-wise subjects); aligned mask IoU with the first draw's subject {iou:.3f}.",
        "",
        "| stage | identity | shape | colour | pattern | outline | alignment |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage in stages:
        cells = " | ".join(f"{mean(stage, m):.3f}" for m in ("identity", "shape", "color", "pattern", "outline"))
        lines.append(f"| {label[stage]} | {cells} | {mean(stage, 'alignment'):.3f} |")
    windows = [stage for stage in stages if stage in rows[0]["window_error"]]
    if windows:
        lines += [
            "",
            "The window: squared distance of the written masked latents to the inverted reference's, relative to the "
            "latter's squared norm (0: on the reference's path; about 2: unrelated), per guided step (the first, "
            "every fourth, the last), the mean over the images that were guided.",
            "",
            "| run | " + " | ".join(f"step {i + 1}" for i in window_steps(rows[0]["window_error"][windows[0]])) + " |",
            "|---|" + "---|" * len(window_steps(rows[0]["window_error"][windows[0]])),
        ]
        for stage in windows:
            errors = np.mean([r["window_error"][stage] for r in rows if stage in r["window_error"]], axis=0)
            picked = window_steps(errors)
            lines.append(f"| {label[stage]} | " + " | ".join(f"{errors[i]:.4f}" for i in picked) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print("\n".join(lines))


def window_steps(errors) -> list[int]:
    return sorted({*range(0, len(errors), 4), len(errors) - 1})


def variant(text: str) -> tuple[str, dict]:
    name, equals, settings = text.partition("=")
    try:
        fields = json.loads(settings)
        ReferenceGuidance(**fields)
    except (ValueError, TypeError) as error:
        message = f"{text!r}: give NAME='{{\"field\": value}}' with ReferenceGuidance's fields ({error})"
        raise argparse.ArgumentTypeError(message) from None
    if not equals or not name or name in STAGES:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME='{{...}}' with a NAME of its own")
    return name, fields


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tinyworld")
    p.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images_per_case", type=int, default=2)
    p.add_argument("--name", default="hifi_reference_probe", help="results file stem: bench/results/<name>.{json,md}")
    p.add_argument("--full", action="store_true", help="also Algorithm 2 in full (about 20 s an image on two cores)")
    p.add_argument(
        "--variants", nargs="+", type=variant, default=[], help="also Algorithm 2 with other settings: NAME='{json}'"
    )
    p.add_argument("--work_dir", default="runs/bench_hifi_tuner", help="the benchmark's work folder, with its runs")
    args = p.parse_args()
    evaluator = Evaluator.load()
    pipe = bench.fresh_pipeline(args.model)
    rows = []
    for name in args.subjects:
        bench.write_kit(SUBJECTS[name], Path(args.work_dir) / "kits" / name)
        rows.append(probe_subject(args, pipe, evaluator, SUBJECTS[name]))
        print(json.dumps({k: v for k, v in rows[-1].items() if not isinstance(v, dict)}), flush=True)
    write_results(args, rows)


if __name__ == "__main__":
    main()
