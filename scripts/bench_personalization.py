"""Benchmarks textual inversion, Cross Initialization and CoRe on tiny-world subject kits with the bundled model.

    python scripts/bench_personalization.py [--subjects all] [--seeds 0 1] [--methods ...] [--name personalization]

For each subject (fixed shape, colour, pattern, outline; 4 reference renders) and training seed: textual inversion
for 1000 steps (read at 100, 320, 1000) and Cross Initialization for 320 steps (read at 100, 320), same batch,
learning rate and data; a constant learning rate makes step N of a long run the same as a run of N steps. Textual
inversion starts from the subject's shape word; Cross Initialization's reference words are the names of its class
(every base colour of that shape, ``--subject_class tinyworld:SHAPE``) and, in a second row, every base-world
"colour shape" name (``tinyworld``). Each
snapshot is loaded into a fresh pipeline with plain ``load_textual_inversion`` and generates the kit's 8 new
contexts x --images_per_case. A "words only" row prompts with the subject's colour and shape instead of a token
(what a user would type), a "full description" row with its pattern and outline named too (the upper bound of text).
CoRe (``--methods core ...``) trains stage 1 for 300 steps from the shape word with the tiny world's contexts, then
stage 2 on the UNet (``--core_unet_steps``, ``--core_unet_lr``); its rows: stage 1, stage 1 + 2, stage 1 + test-time
optimization for each evaluation prompt (10 steps), and stage 1 without each regularizer and without rescaling.
Columns: identity (all four subject attributes; pattern and outline alone), evaluator-embedding cosine to the
references, prompt alignment, learned-embedding norm / initial norm, wall time of training to that step, and the
peak memory of each training kind (a few steps in a process of its own, resident memory above the loaded model).
Writes bench/results/personalization.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from genreg import load_pipeline
from genreg.embeddings import EMBEDS_FILE, INIT_FILE, load_learned_embeds
from genreg.methods.core import CoReConfig, train_core, tune_for_prompt
from genreg.methods.cross_init import CrossInitConfig, train_cross_init
from genreg.methods.textual_inversion import TextualInversionConfig, train_textual_inversion
from genreg.profiling import rss_mib
from genreg.tinyworld import Evaluator, render
from genreg.tinyworld.subjects import SUBJECTS, evaluation_cases, reference_scenes, score_subject, write_kit
from genreg.training import TrainConfig

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
METRICS = ("identity", "shape", "color", "pattern", "outline", "embedding_similarity", "alignment")


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
# CoRe runs: method label -> settings over CoReConfig's defaults (the paper's); "core" also runs stage 2.
# "x-scaled": weights that make each regularizer's gradient about a tenth of the diffusion loss's, measured at a
# textual-inversion token on the first kit's training images (at the paper's weights the ratios are ~1e-5 here, so
# the regularizers cannot act); its ablations leave out one term each.
SCALED = {"embedding_weight": 1.25, "attention_weight": 280.0}
CORE = {
    "core": {},
    "core, no rescaling": {"rescale_start": 0.0, "rescale_end": 0.0},
    "core x-scaled": SCALED,
    "core x-scaled, no context embedding reg": SCALED | {"embedding_weight": 0.0},
    "core x-scaled, no context attention reg": SCALED | {"attention_weight": 0.0},
    "core x-scaled, no rescaling": SCALED | {"rescale_start": 0.0, "rescale_end": 0.0},
}
CORE_STAGE2, CORE_TTO = "core + stage 2 (UNet)", "core + test-time optimization"
TI_ONE = "textual-inversion, 1 vector"  # CoRe's vector count: the like-for-like baseline of its rows
METHODS = ("textual-inversion", TI_ONE, *CROSS_INIT, *CORE)
# Each row's training kind, whose peak memory is probed: the same for rows whose training differs only in weights.
MEMORY_KIND = {TI_ONE: "textual-inversion", "cross-init, every shape": "cross-init"}
MEMORY_KIND |= {CORE_STAGE2: "core + stage 2", CORE_TTO: "core stage 1"}
MEMORY_KIND |= {m: "core stage 1" for m in CORE if not m.endswith("no context attention reg")}
MEMORY_KIND["core x-scaled, no context attention reg"] = "core, no context attention reg"


def train_steps(method: str, args) -> list[int]:
    if method in ("textual-inversion", TI_ONE):
        return args.ti_steps
    return args.ci_steps if method in CROSS_INIT else args.core_steps


def train_run(method: str, args, subject, kit: Path, seed: int, out: Path, pipe=None, watch=None) -> dict:
    """Trains one embedding (CoRe's "core" run: and stage 2) on ``pipe`` (default: a fresh one); returns the wall time
    (s) at which each stage-1 step finished, and under "total" the whole run's. ``watch()`` runs after every step."""
    common = {"train_data_dir": str(kit), "placeholder_token": f"<{subject.name}>", "flip_p": 0.0}
    steps = train_steps(method, args)
    train = TrainConfig(
        output_dir=str(out),
        max_train_steps=max(steps),
        train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        checkpointing_steps=int(np.gcd.reduce(steps)),
        seed=seed,
        report_to="none",
    )
    pipe = pipe or fresh_pipeline(args.model)
    times: dict = {}
    start = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        times.setdefault(step, time.perf_counter() - start)
        if watch is not None:
            watch()

    if method in ("textual-inversion", TI_ONE):
        vectors = 1 if method == TI_ONE else 2
        config = TextualInversionConfig(**common, num_vectors=vectors, initializer_token=subject.shape)
        train_textual_inversion(pipe, config, train, on_step=on_step)
    elif method in CROSS_INIT:
        subject_class = CROSS_INIT[method].format(shape=subject.shape)
        config = CrossInitConfig(**common, num_vectors=2, subject_class=subject_class, reg_weight=args.reg_weight)
        train_cross_init(pipe, config, train, on_step=on_step)
    else:
        stage2 = {"unet_steps": args.core_unet_steps, "unet_learning_rate": args.core_unet_lr}
        config = core_config(subject, common | CORE[method] | (stage2 if method == "core" else {}))
        train_core(pipe, config, train, on_step=on_step)
    times["total"] = time.perf_counter() - start
    return times


def core_config(subject, values: dict) -> CoReConfig:
    return CoReConfig(**values, initializer_token=subject.shape, prompt_set="tinyworld")


def tto_images(args, subject, kit: Path, cases, snapshot: Path, seed: int, out: Path) -> tuple[list, float]:
    """CoRe + test-time optimization: the stage-1 token tuned for each evaluation prompt, then that prompt's images;
    returns them in ``generate``'s order (prompts x images per case) and the seconds of optimization."""
    per_case, seconds = [], 0.0
    common = {"train_data_dir": str(kit), "placeholder_token": f"<{subject.name}>", "flip_p": 0.0}
    for i, case in enumerate(cases):
        pipe = fresh_pipeline(args.model)
        pipe.load_textual_inversion(str(snapshot))
        config = core_config(subject, common)
        train = TrainConfig(
            output_dir=str(out / f"case{i}"),
            max_train_steps=config.tto_steps,
            train_batch_size=args.batch_size,
            learning_rate=config.tto_learning_rate,
            checkpointing_steps=0,
            seed=seed,
            report_to="none",
        )
        start = time.perf_counter()
        tune_for_prompt(pipe, config, train, case.template)
        seconds += time.perf_counter() - start
        per_case.append(generate(pipe, [case.prompt(config.placeholder_token)], args.images_per_case, seed))
    return [per_case[c][r] for r in range(args.images_per_case) for c in range(len(cases))], seconds


def scored(kit_view: tuple, label: str, steps: int, images, seconds: float, vectors) -> dict:
    """One run's row: the evaluator's identity and alignment of ``images``, the norm ratio and the training time."""
    evaluator, subject, cases, references, init, seed = kit_view
    scores = score_subject(evaluator, images, cases, subject, references)
    ratio = float(vectors.norm(dim=-1).mean() / init.norm(dim=-1).mean())
    row = {"method": label, "steps": steps, "subject": subject.name, "seed": seed, "images": len(images)}
    row |= scores | {"norm_ratio": ratio, "seconds": seconds}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    return row


def probe_memory(args, kind: str) -> float:
    """Peak resident memory (MiB) of a few training steps of ``kind`` above the loaded model, in its own process."""
    command = [sys.executable, __file__, "--probe", kind, "--model", args.model, "--work_dir", args.work_dir]
    command += ["--batch_size", str(args.batch_size), "--subjects", args.subjects[0]]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def probe(args) -> None:
    """The ``--probe`` process: trains 5 steps of one kind on a loaded model; prints the most resident memory seen
    after a step above what it was before training (freed memory stays resident, so this is the peak's floor)."""
    subject = SUBJECTS[args.subjects[0]]
    kit = write_kit(subject, Path(args.work_dir) / "kits" / subject.name)
    out = Path(args.work_dir) / "probe" / args.probe.replace(" ", "-")
    shutil.rmtree(out, ignore_errors=True)
    args.ti_steps = args.ci_steps = args.core_steps = [5]
    method = {"core stage 1": "core", "core + stage 2": "core"}.get(args.probe, args.probe)
    if method == "core, no context attention reg":
        method = "core x-scaled, no context attention reg"
    args.core_unet_steps = 5 if args.probe == "core + stage 2" else 0
    pipe = fresh_pipeline(args.model)
    before, seen = rss_mib(), []
    train_run(method, args, subject, kit, 0, out, pipe=pipe, watch=lambda: seen.append(rss_mib()))
    print(max(seen) - before)


def summarize(rows: list[dict]) -> list[dict]:
    """One table row per (method, steps): the means over its runs, and the images read."""
    table = []
    for key in dict.fromkeys((r["method"], r["steps"]) for r in rows):
        group = [r for r in rows if (r["method"], r["steps"]) == key]
        mean = {m: float(np.mean([r[m] for r in group])) for m in (*METRICS, "norm_ratio", "seconds") if m in group[0]}
        images = sum(r["images"] for r in group)
        table.append({"method": key[0], "steps": key[1], "runs": len(group), "images": images} | mean)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tinyworld")
    p.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--ti_steps", nargs="+", type=int, default=[100, 320, 1000])
    p.add_argument("--ci_steps", nargs="+", type=int, default=[100, 320])
    p.add_argument("--core_steps", nargs="+", type=int, default=[300])
    p.add_argument("--core_unet_steps", type=int, default=200)
    p.add_argument("--core_unet_lr", type=float, default=5e-5)
    p.add_argument(
        "--methods",
        nargs="+",
        default=["textual-inversion", *CROSS_INIT],
        choices=list(METHODS),
        help="trained rows (default: textual inversion and Cross Initialization; CoRe's rows on request)",
    )
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=5e-3)
    p.add_argument("--reg_weight", type=float, default=1e-5)
    p.add_argument("--images_per_case", type=int, default=2)
    p.add_argument("--work_dir", default="runs/bench_personalization")
    p.add_argument("--name", default="personalization", help="results file stem: bench/results/<name>.{json,md}")
    p.add_argument("--memory_only", action="store_true", help="measure the memory of <name>.json's run again")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one memory probe
    args = p.parse_args()
    if not args.name or Path(args.name).name != args.name:
        p.error(f"--name is a file stem inside bench/results (e.g. personalization_core), not {args.name!r}")
    if args.probe:
        return probe(args)
    if args.memory_only:  # the training kinds' memory again, over an earlier run's scores
        earlier = json.loads((RESULTS / f"{args.name}.json").read_text())
        vars(args).update({k: v for k, v in earlier["settings"].items() if k not in ("memory_only", "probe")})
        command = f"{earlier['command']}` (memory measured again: `... --name {args.name} --memory_only"
        return write_results(args, summarize(earlier["runs"]), earlier["runs"], command)

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
        for method in args.methods:
            for seed in args.seeds:
                out = work / method.replace(", ", "_").replace(" ", "-") / name / f"seed{seed}"
                shutil.rmtree(out, ignore_errors=True)  # a fresh run: a trainer refuses an earlier run's checkpoints
                times = train_run(method, args, subject, kit, seed, out)
                _, init = load_learned_embeds(out / INIT_FILE)
                kit_view = (evaluator, subject, cases, references, init, seed)
                for steps in train_steps(method, args):
                    snapshot = out / f"checkpoint-{steps}"
                    token, vectors = load_learned_embeds(snapshot / EMBEDS_FILE)
                    pipe = fresh_pipeline(args.model)
                    pipe.load_textual_inversion(str(snapshot))  # the standard loader, as a user would
                    images = generate(pipe, [c.prompt(token) for c in cases], args.images_per_case, seed)
                    rows.append(scored(kit_view, method, steps, images, times[steps], vectors))
                if method != "core":
                    continue
                if args.core_unet_steps:  # stage 2: the stage-1 token with the tuned UNet, loaded as a user would
                    pipe.unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
                    images = generate(pipe, [c.prompt(token) for c in cases], args.images_per_case, seed)
                    total = steps + args.core_unet_steps
                    rows.append(scored(kit_view, CORE_STAGE2, total, images, times["total"], vectors))
                images, seconds = tto_images(args, subject, kit, cases, snapshot, seed, out / "tto")
                rows.append(scored(kit_view, CORE_TTO, steps, images, times[steps] + seconds / len(cases), vectors))

    command = shlex.join(["python", "scripts/bench_personalization.py", *sys.argv[1:]])
    write_results(args, summarize(rows), rows, command)


def write_results(args, table: list[dict], rows: list[dict], command: str) -> None:
    """Probes each training kind's memory, then writes bench/results/<name>.{json,md}."""
    kinds = {MEMORY_KIND.get(r["method"], r["method"]) for r in table if r["steps"]}
    memory = {kind: probe_memory(args, kind) for kind in sorted(kinds)}
    for r in table:
        r["peak_mib"] = memory.get(MEMORY_KIND.get(r["method"], r["method"]))

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"settings": vars(args), "command": command, "table": table, "runs": rows}, indent=1)
    )
    lines = [
        "# Personalization benchmark: textual inversion, Cross Initialization and CoRe",
        "",
        f"Command: `{command}`",
        "",
        f"Bundled `tinyworld` model; {len(args.subjects)} subjects x seeds {args.seeds}; 2 vectors (but `{TI_ONE}`), "
        f"batch {args.batch_size}, lr {args.learning_rate:g} (constant), Cross Init lambda {args.reg_weight:g}, "
        "reference words: every base colour of the subject's shape (`cross-init`) or every base-world 'colour shape' "
        "name; textual inversion starts from the subject's shape word. CoRe: 1 vector from the shape word, batch "
        f"{args.batch_size}, the paper's weights, the tiny world's contexts; stage 2 {args.core_unet_steps} steps at "
        f"lr {args.core_unet_lr:g}; test-time optimization 10 steps at lr 5e-4 per evaluation prompt. Train s: "
        "stage 1 to that step (stage 2: the whole run; test-time: plus one prompt's optimization). Peak MiB: the most "
        "resident memory after any of 5 training steps of the row's kind, above the loaded model's, in a process of "
        "its own. Each "
        f"snapshot generates 8 new contexts x {args.images_per_case} images (25 DDIM steps, guidance 5).",
        "",
        "| method | steps | runs | images | identity | shape | colour | pattern | outline | embedding cos | alignment "
        "| norm / init | train s | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        cols = " | ".join(f"{r[m]:.3f}" for m in METRICS)
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        extra = f"{r['norm_ratio']:.2f} | {r['seconds']:.0f} | {peak}" if "norm_ratio" in r else "- | - | -"
        lines.append(f"| {r['method']} | {r['steps']} | {r['runs']} | {r['images']} | {cols} | {extra} |")
    lines.append("")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
