"""Benchmarks textual inversion against Cross Initialization on tiny-world subject kits with the bundled model.

    python scripts/bench_personalization.py [--subjects all] [--seeds 0 1]

For each subject (fixed shape, colour, pattern, outline; 4 reference renders) and training seed: textual inversion
for 1000 steps (read at 100, 320, 1000) and Cross Initialization for 320 steps (read at 100, 320), same batch,
learning rate and data; a constant learning rate makes step N of a long run the same as a run of N steps. Textual
inversion starts from the subject's shape word; Cross Initialization's reference words are the names of its class
(every base colour of that shape, ``--subject_class tinyworld:SHAPE``) and, in a second row, every base-world
"colour shape" name (``tinyworld``). Each
snapshot is loaded into a fresh pipeline with plain ``load_textual_inversion`` and generates the kit's 8 new
contexts x --images_per_case. A "words only" row prompts with the subject's colour and shape instead of a token
(what a user would type), a "full description" row with its pattern and outline named too (the upper bound of text).
Columns: identity (all four subject attributes; pattern and outline alone), evaluator-embedding cosine to the
references, prompt alignment, learned-embedding norm / initial norm, wall time of training to that step.
Writes bench/results/personalization.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from genreg import load_pipeline
from genreg.embeddings import EMBEDS_FILE, INIT_FILE, load_learned_embeds
from genreg.methods.cross_init import CrossInitConfig, train_cross_init
from genreg.methods.textual_inversion import TextualInversionConfig, train_textual_inversion
from genreg.tinyworld import Evaluator, render
from genreg.tinyworld.subjects import SUBJECTS, evaluation_cases, reference_scenes, score_subject, write_kit
from genreg.training import TrainConfig

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
METRICS = ("identity", "pattern", "outline", "embedding_similarity", "alignment")


def generate(pipe, prompts: list[str], per_case: int, seed: int):
    return pipe(
        prompts * per_case,
        num_inference_steps=25,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
    ).images


def fresh_pipeline(model: str):
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Cross Initialization rows: method label -> subject class (reference words), given the subject's shape.
CROSS_INIT = {"cross-init": "tinyworld:{shape}", "cross-init, every shape": "tinyworld"}


def train_run(method: str, args, subject, kit: Path, seed: int, out: Path) -> dict[int, float]:
    """Trains one embedding; returns the wall time (s) at which each step finished."""
    common = {"train_data_dir": str(kit), "placeholder_token": f"<{subject.name}>", "num_vectors": 2, "flip_p": 0.0}
    steps = args.ti_steps if method == "textual-inversion" else args.ci_steps
    train = TrainConfig(
        output_dir=str(out),
        max_train_steps=max(steps),
        train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        checkpointing_steps=int(np.gcd.reduce(steps)),
        seed=seed,
        report_to="none",
    )
    pipe = fresh_pipeline(args.model)
    times: dict[int, float] = {}
    start = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        times[step] = time.perf_counter() - start

    if method == "textual-inversion":
        config = TextualInversionConfig(**common, initializer_token=subject.shape)
        train_textual_inversion(pipe, config, train, on_step=on_step)
    else:
        subject_class = CROSS_INIT[method].format(shape=subject.shape)
        config = CrossInitConfig(**common, subject_class=subject_class, reg_weight=args.reg_weight)
        train_cross_init(pipe, config, train, on_step=on_step)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tinyworld")
    p.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--ti_steps", nargs="+", type=int, default=[100, 320, 1000])
    p.add_argument("--ci_steps", nargs="+", type=int, default=[100, 320])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=5e-3)
    p.add_argument("--reg_weight", type=float, default=1e-5)
    p.add_argument("--images_per_case", type=int, default=2)
    p.add_argument("--work_dir", default="runs/bench_personalization")
    args = p.parse_args()

    evaluator = Evaluator.load()
    work = Path(args.work_dir)
    rows = []
    for name in args.subjects:
        subject = SUBJECTS[name]
        kit = write_kit(subject, work / "kits" / name)
        references = [render(s)[0] for s in reference_scenes(subject)]
        cases = evaluation_cases(subject)
        base = fresh_pipeline(args.model)
        for method, text in (("words only", subject.words), ("full description", subject.description)):
            for seed in args.seeds:
                images = generate(base, [c.prompt(text) for c in cases], args.images_per_case, seed)
                scores = score_subject(evaluator, images, cases, subject, references)
                row = {"method": method, "steps": 0, "subject": name, "seed": seed, "images": len(images)}
                rows.append(row | scores)
        for method in ("textual-inversion", *CROSS_INIT):
            for seed in args.seeds:
                out = work / method.replace(", ", "_").replace(" ", "-") / name / f"seed{seed}"
                times = train_run(method, args, subject, kit, seed, out)
                _, init = load_learned_embeds(out / INIT_FILE)
                for steps in args.ti_steps if method == "textual-inversion" else args.ci_steps:
                    snapshot = out / f"checkpoint-{steps}"
                    token, vectors = load_learned_embeds(snapshot / EMBEDS_FILE)
                    pipe = fresh_pipeline(args.model)
                    pipe.load_textual_inversion(str(snapshot))  # the standard loader, as a user would
                    images = generate(pipe, [c.prompt(token) for c in cases], args.images_per_case, seed)
                    scores = score_subject(evaluator, images, cases, subject, references)
                    ratio = float(vectors.norm(dim=-1).mean() / init.norm(dim=-1).mean())
                    row = {"method": method, "steps": steps, "subject": name, "seed": seed, "images": len(images)}
                    row |= scores
                    rows.append(row | {"norm_ratio": ratio, "seconds": times[steps]})
                    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}))

    table = []
    for key in dict.fromkeys((r["method"], r["steps"]) for r in rows):
        group = [r for r in rows if (r["method"], r["steps"]) == key]
        mean = {m: float(np.mean([r[m] for r in group])) for m in (*METRICS, "norm_ratio", "seconds") if m in group[0]}
        images = sum(r["images"] for r in group)
        table.append({"method": key[0], "steps": key[1], "runs": len(group), "images": images} | mean)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "personalization.json").write_text(
        json.dumps({"settings": vars(args), "table": table, "runs": rows}, indent=1)
    )
    lines = [
        "# Personalization benchmark: textual inversion vs Cross Initialization",
        "",
        f"Command: `{shlex.join(['python', 'scripts/bench_personalization.py', *sys.argv[1:]])}`",
        "",
        f"Bundled `tinyworld` model; {len(args.subjects)} subjects x seeds {args.seeds}; 2 vectors, batch "
        f"{args.batch_size}, lr {args.learning_rate:g} (constant), Cross Init lambda {args.reg_weight:g}, reference "
        "words: every base colour of the subject's shape (`cross-init`) or every base-world 'colour shape' name; "
        "textual inversion starts from the subject's shape word. Each "
        f"snapshot generates 8 new contexts x {args.images_per_case} images (25 DDIM steps, guidance 5).",
        "",
        "| method | steps | runs | images | identity | pattern | outline | embedding cos | alignment | norm / init "
        "| train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        cols = " | ".join(f"{r[m]:.3f}" for m in METRICS)
        extra = f"{r['norm_ratio']:.2f} | {r['seconds']:.0f}" if "norm_ratio" in r else "- | -"
        lines.append(f"| {r['method']} | {r['steps']} | {r['runs']} | {r['images']} | {cols} | {extra} |")
    lines.append("")
    (RESULTS / "personalization.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
