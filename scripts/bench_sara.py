"""Benchmarks SaRA against LoRA (peft, attention projections) and full fine-tuning on a tiny-world concept kit.

    python scripts/bench_sara.py [--concept checkered] [--steps 400] [--batch_size 8] [--rows base sara lora:3e-4 ...]
    python scripts/bench_sara.py --sd15_memory --batch_size 1 --memory_steps 2   # memory at SD 1.5's size

Task: teach the bundled model a held-out value (``genreg.tinyworld.concepts``: renders whose captions name it) at
equal steps, batch and data for every row. Rows: the untouched model; SaRA with its threshold set so that it trains
as many weights as the LoRA row; SaRA without the low-rank loss and without progressive re-selection (ablations);
SaRA on LoRA's weights only (``sara-attention``: the attention projections, as many weights as LoRA); LoRA of rank
--lora_rank on every attention projection (diffusers' text-to-image LoRA setup); full fine-tuning.
A row named ``ROW:LR`` is that row at learning rate LR (SaRA's default is the paper's rule, 1e-3 exp(-350 theta)).
Each row trains in its own process, so its peak memory (CPU RSS, and CUDA's peak where a GPU is used) is its own
(``--memory_only`` measures it again over a few steps, with the peak of live CPU tensors beside the RSS);
the result is saved in the method's format, loaded into a fresh plain diffusers pipeline with the standard loader
(``genreg.methods.sara.load_into``, ``load_lora_weights``, ``UNet2DConditionModel.from_pretrained``) and scored:
new-value accuracy (the evaluator reads the concept on prompts that name it in combinations the kit does not hold)
and the retained all-correct rate on standard single-object prompts. ``--train_seeds 0 1 2`` trains every row once per
seed (same kit, prompts and image seeds) and reports each score's mean and range: one training run moves the scores
by several points. Writes bench/results/<--name>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from genreg import load_pipeline
from genreg.diffusion import FineTuneObjective
from genreg.methods.sara import (
    DELTA_FILE,
    SaRAConfig,
    SaRADelta,
    SaRATrainingConfig,
    auto_learning_rate,
    load_into,
    train_sara,
)
from genreg.profiling import peak_rss_mib, rss_mib, tensor_peak
from genreg.tinyworld import Evaluator, sample_scene, scene_prompt
from genreg.tinyworld.concepts import CONCEPTS, concept_prompts, write_concept_kit
from genreg.training import TrainConfig, fit

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_WEIGHTS = tuple(f"*.{name}.weight" for name in LORA_TARGETS)  # the weights LoRA adapts, as SaRA targets


SD15 = "sd15-random"  # --sd15_memory's model: SD 1.5's architecture with seeded random weights


def fresh(model: str, device: str):
    if model == SD15:
        from bench_gpu_sd15 import sd15_components  # a sibling script: SD 1.5-size random components

        torch.manual_seed(0)  # the same weights in every process, so the rows' thresholds select the same entries
        pipe = StableDiffusionPipeline(**sd15_components()).to(device)
    else:
        pipe = load_pipeline(model, device=device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)


@functools.cache  # each loads the model: main and every row's spec ask again
def lora_count(model: str, rank: int) -> int:
    unet = fresh(model, "cpu").unet
    unet.add_adapter(lora_config(rank))
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


@functools.cache
def matching_threshold(model: str, count: int, targets: tuple[str, ...] = ("*",)) -> float:
    """The threshold below which exactly ``count`` UNet weights of the ``targets`` tensors lie (so SaRA trains as
    many weights as LoRA)."""
    config = SaRAConfig(targets=targets)
    unet = fresh(model, "cpu").unet
    weights = torch.cat([p.detach().abs().flatten() for n, p in unet.named_parameters() if config.wanted(n)])
    return float(torch.kthvalue(weights, count + 1).values)


def train_row(args) -> None:
    spec = json.loads(args.row)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = fresh(args.model, device)
    out = Path(spec["out"])
    train = TrainConfig(
        output_dir=str(out),
        max_train_steps=args.steps,
        train_batch_size=args.batch_size,
        learning_rate=spec["lr"],
        lr_scheduler="constant",
        checkpointing_steps=0,
        max_grad_norm=1.0,
        seed=spec["seed"],
        report_to="none",
    )
    before = rss_mib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with tensor_peak() if spec.get("profile") else contextlib.nullcontext() as tensors:
        files, trainable = train_method(args, spec, pipe, train, out)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    report = {
        "learning_rate": spec["lr"] or auto_learning_rate(spec["sara"]["threshold"]),
        "trainable": trainable,
        "seconds_per_step": seconds / args.steps,
        "peak_rss_mib": peak,
        "peak_rss_above_loaded_mib": peak - before,
        "saved_bytes": sum(f.stat().st_size for f in files),
    }
    if spec["method"] == "sara":
        report["threshold"] = spec["sara"]["threshold"]
    if tensors is not None:
        report["peak_tensor_mib"] = tensors.peak_mib
    if device == "cuda":
        report["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (out / "row.json").write_text(json.dumps(report))


def train_method(args, spec: dict, pipe, train: TrainConfig, out: Path) -> tuple[list[Path], int]:
    """Trains row ``spec`` and saves it in its method's format; returns the saved files and the trainable count."""
    if spec["method"] == "sara":
        config = SaRATrainingConfig(train_data_dir=args.kit, flip_p=0.0, **spec["sara"])
        files = [train_sara(pipe, config, train)]
        trainable = SaRADelta.load(files[0]).num_entries
    else:
        if spec["method"] == "lora":
            pipe.unet.add_adapter(lora_config(args.lora_rank))
        else:
            pipe.unet.requires_grad_(True)
        trainable = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)
        data = SaRATrainingConfig(train_data_dir=args.kit, flip_p=0.0).read(pipe)
        fit(FineTuneObjective(pipe), lambda step, i: data.sample(pipe.tokenizer, train.seed, step, i), train)
        files = save_result(pipe, spec["method"], out)
    return files, trainable


def save_result(pipe, method: str, out: Path) -> list[Path]:
    if method == "lora":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
        return [out / "pytorch_lora_weights.safetensors"]
    pipe.unet.save_pretrained(out / "unet")
    return list((out / "unet").glob("*.safetensors"))


def load_row(model: str, method: str, out: Path):
    """A fresh plain diffusers pipeline with the row's saved result loaded by the standard loader."""
    pipe = fresh(model, "cpu")
    if method == "sara":
        load_into(pipe, out / DELTA_FILE)
    elif method == "lora":
        pipe.load_lora_weights(out)
    elif method == "full":
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(out / "unet")
    return pipe


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


def score(pipe, evaluator: Evaluator, prompts: list[str], seed: int, repeats: int = 1) -> dict:
    """The evaluator's readings of ``repeats`` images of each prompt (the r-th with seeds from seed + r * 10,000)."""
    images = []
    for r in range(repeats):
        for i in range(0, len(prompts), 50):
            chunk = prompts[i : i + 50]
            generators = [torch.Generator().manual_seed(seed + r * 10_000 + i + k) for k in range(len(chunk))]
            images += pipe(chunk, num_inference_steps=25, guidance_scale=5.0, generator=generators).images
    return evaluator.score(images, prompts * repeats)


SCORES = ("new_value", "new_all_correct", "retained_all_correct")


def mean_over_seeds(runs: list[dict]) -> dict:
    """One row from its training runs (one per seed): the scores' means, each run's scores and time per step under
    ``runs``, the median time per step, and the first run's memory and size (they do not depend on the seed)."""
    row = runs[0] | {name: sum(r[name] for r in runs) / len(runs) for name in SCORES}
    if len(runs) > 1:
        row["runs"] = [{k: r[k] for k in (*SCORES, "seed", "seconds_per_step") if k in r} for r in runs]
        if "seconds_per_step" in row:
            row["seconds_per_step"] = statistics.median(r["seconds_per_step"] for r in runs)
    return row


def cell(row: dict, name: str) -> str:
    """A score, as the mean and the range of the runs when the row was trained with several seeds."""
    if "runs" not in row:
        return f"{row[name]:.3f}"
    values = [r[name] for r in row["runs"]]
    return f"{row[name]:.3f} ({min(values):.3f}-{max(values):.3f})"


ROWS = ("base", "sara", "sara-no-rank", "sara-no-progressive", "sara-attention", "lora", "full")


def row_name(text: str) -> str:
    """A --rows entry, ROW or ROW:LEARNING_RATE; refused before anything is written when either part is wrong."""
    kind, colon, lr = text.partition(":")
    if kind not in ROWS or (colon and kind == "base"):
        raise argparse.ArgumentTypeError(f"unknown row {text!r}: choose from {', '.join(ROWS)} (base takes no rate)")
    try:
        if colon and not float(lr) > 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the learning rate after ':' is a positive number") from None
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tinyworld")
    p.add_argument("--concept", default="checkered", choices=tuple(CONCEPTS))
    p.add_argument("--kit_size", type=int, default=24)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lora_rank", type=int, default=4)
    p.add_argument("--lora_lr", type=float, default=1e-3, help="LoRA's learning rate")
    p.add_argument("--full_lr", type=float, default=1e-4, help="full fine-tuning's learning rate")
    p.add_argument("--eval_prompts", type=int, default=60, help="prompts naming the concept")
    p.add_argument("--retain_prompts", type=int, default=100, help="standard single-object prompts")
    p.add_argument("--images_per_prompt", type=int, default=1, help="images scored per prompt (other seeds)")
    p.add_argument(
        "--rows",
        nargs="+",
        type=row_name,
        default=list(ROWS),
        help=f"rows to run, each optionally as ROW:LEARNING_RATE; rows: {', '.join(ROWS)}",
    )
    p.add_argument("--seed", type=int, default=0, help="the kit, the prompts and the image seeds")
    p.add_argument(
        "--train_seeds",
        type=int,
        nargs="+",
        default=None,
        help="train every row once per seed (default: --seed), scored on the same prompts and images' seeds; the "
        "table gives the mean and the range",
    )
    p.add_argument("--work_dir", default="runs/bench_sara")
    p.add_argument("--name", default="sara", help="results file stem: bench/results/<name>.{json,md}")
    p.add_argument(
        "--memory_only", action="store_true", help="measure the trained rows' peak memory again (<name>.json's run)"
    )
    p.add_argument("--memory_steps", type=int, default=10, help="training steps of a --memory_only measurement")
    p.add_argument(
        "--sd15_memory",
        action="store_true",
        help="SaRA's and LoRA's training memory at SD 1.5's size (random weights; with --batch_size 1 --memory_steps "
        "2 on a CPU)",
    )
    p.add_argument("--kit", help=argparse.SUPPRESS)
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: train one row in this process
    args = p.parse_args()
    if args.sd15_memory and (args.memory_only or args.model != p.get_default("model")):
        p.error(
            "--sd15_memory measures its own SD 1.5-size model with random weights: leave out --memory_only and --model"
        )
    if args.row:
        train_row(args)
        return

    if args.memory_only:
        return measure_memory(args)
    if args.sd15_memory:
        return measure_sd15(args)
    work = Path(args.work_dir)
    kit = write_concept_kit(args.concept, work / "kit", n=args.kit_size, seed=args.seed)
    count = lora_count(args.model, args.lora_rank)
    threshold = matching_threshold(args.model, count)
    evaluator = Evaluator.load()
    concept = concept_prompts(args.concept, args.eval_prompts, seed=args.seed)
    attribute = CONCEPTS[args.concept]
    rng = random.Random(f"retain-{args.seed}")
    retain = [scene_prompt(sample_scene(rng, n_objects=1), background=True) for _ in range(args.retain_prompts)]
    seeds = args.train_seeds or [args.seed]
    rows = {}
    for name in args.rows:
        runs = []
        for seed in seeds if name != "base" else seeds[:1]:
            out = work / name.replace(":", "-lr") if len(seeds) == 1 else work / f"{name.replace(':', '-lr')}-s{seed}"
            spec = row_spec(args, name, threshold, out) | {"seed": seed}
            if spec["method"] != "base":
                command = [sys.executable, __file__, *sys.argv[1:], "--kit", str(kit), "--row", json.dumps(spec)]
                subprocess.run(command, check=True)
            pipe = load_row(args.model, spec["method"], out)
            new = score(pipe, evaluator, [prompt for prompt, _ in concept], args.seed, args.images_per_prompt)
            kept = score(pipe, evaluator, retain, args.seed + 1, args.images_per_prompt)
            run = {"new_value": new[attribute], "new_all_correct": new["all_correct"]}
            run["retained_all_correct"] = kept["all_correct"]
            if spec["method"] != "base":
                run |= json.loads((out / "row.json").read_text()) | {"seed": seed}
            print(name, run, flush=True)
            runs.append(run)
        rows[name] = mean_over_seeds(runs)
    write_results(args, rows, threshold, count, shlex.join(["python", "scripts/bench_sara.py", *sys.argv[1:]]))


def row_spec(args, name: str, threshold: float, out: Path) -> dict:
    """What row ``name`` (``ROW`` or ``ROW:LR``) trains, for ``train_row``."""
    kind, _, lr = name.partition(":")
    sara = {"threshold": threshold, "lambda_rank": 5e-3, "progressive_fraction": 0.5}
    specs = {
        "sara": {"method": "sara", "sara": sara},
        "sara-no-rank": {"method": "sara", "sara": sara | {"lambda_rank": 0.0}},
        "sara-no-progressive": {"method": "sara", "sara": sara | {"progressive_fraction": 0.0}},
        "sara-attention": {"method": "sara", "sara": sara | {"targets": LORA_WEIGHTS}},
        "lora": {"method": "lora", "lr": args.lora_lr},
        "full": {"method": "full", "lr": args.full_lr},
    }
    spec = specs.get(kind, {"method": "base"})
    if kind == "sara-attention":  # the weights LoRA adapts, as many as LoRA trains
        count = lora_count(args.model, args.lora_rank)
        spec["sara"]["threshold"] = matching_threshold(args.model, count, LORA_WEIGHTS)
    return spec if spec["method"] == "base" else spec | {"out": str(out), "lr": float(lr) if lr else spec.get("lr")}


def measure_memory(args) -> None:
    """Each trained row of bench/results/<name>.json trained again for --memory_steps steps, in a process of its own,
    for its peak memory; the scores stay those of the full run."""
    earlier = json.loads((RESULTS / f"{args.name}.json").read_text())
    vars(args).update({k: v for k, v in earlier["settings"].items() if k not in ("memory_only", "memory_steps")})
    kit = write_concept_kit(args.concept, Path(args.work_dir) / "kit", n=args.kit_size, seed=args.seed)
    rows = earlier["rows"]
    for name, row in rows.items():
        spec = row_spec(args, name, earlier["threshold"], Path(args.work_dir) / "memory" / name.replace(":", "-lr"))
        if spec["method"] != "base":
            measured = memory_run(args, spec | {"seed": args.seed}, kit)
            row |= {k: measured[k] for k in ("peak_rss_mib", "peak_rss_above_loaded_mib", "peak_tensor_mib")}
            print(name, row["peak_rss_mib"], row["peak_tensor_mib"], flush=True)
    memory = f"peak memory measured again over {args.memory_steps} steps per row: `--memory_only`"
    write_results(args, rows, earlier["threshold"], earlier["lora_trainable"], earlier["command"], memory)


def memory_run(args, spec: dict, kit: Path) -> dict:
    """Row ``spec`` trained for --memory_steps steps in a process of its own, twice: for its resident memory, then
    for its live tensors in a profiled process (the profiler's own records take memory); its row.json figures."""
    out = Path(spec["out"])
    command = [sys.executable, __file__, "--model", args.model, "--batch_size", str(args.batch_size)]
    command += ["--steps", str(args.memory_steps), "--lora_rank", str(args.lora_rank), "--seed", str(args.seed)]
    command += ["--kit", str(kit), "--row"]
    shutil.rmtree(out, ignore_errors=True)  # an empty folder: a trainer refuses one with another run's checkpoints
    subprocess.run([*command, json.dumps(spec)], check=True)
    measured = json.loads((out / "row.json").read_text())
    shutil.rmtree(out)
    subprocess.run([*command, json.dumps(spec | {"profile": True})], check=True)
    return measured | {"peak_tensor_mib": json.loads((out / "row.json").read_text())["peak_tensor_mib"]}


def measure_sd15(args) -> None:
    """SaRA (every UNet tensor) and LoRA (attention projections) at SD 1.5's size with as many trainable weights,
    random weights, --memory_steps steps at --batch_size on the kit (upscaled to 512 px): peak memory and time per
    step of each, in processes of their own. Writes bench/results/sara_sd15_memory.{json,md}."""
    args.model = SD15
    kit = write_concept_kit(args.concept, Path(args.work_dir) / "kit", n=args.kit_size, seed=args.seed)
    count = lora_count(SD15, args.lora_rank)
    threshold = matching_threshold(SD15, count)
    rows = {}
    for name in ("sara", "lora"):
        spec = row_spec(args, name, threshold, Path(args.work_dir) / "sd15" / name) | {"seed": args.seed}
        rows[name] = memory_run(args, spec, kit)
        print(name, rows[name], flush=True)
    command = shlex.join(["python", "scripts/bench_sara.py", *sys.argv[1:]])
    device = "CUDA" if torch.cuda.is_available() else "CPU"
    result = {"command": command, "device": device, "threshold": threshold, "lora_trainable": count, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sara_sd15_memory.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# SaRA vs LoRA: training memory at Stable Diffusion 1.5's size (random weights)",
        "",
        f"`{command}`; {device}, fp32, 512x512, batch {args.batch_size}, {args.memory_steps} steps per row, each "
        f"in a process of its own; SaRA on every UNet tensor at threshold {threshold:.3g}, as many weights as LoRA "
        f"rank {args.lora_rank} on the attention projections ({count:,}). Peak tensor MiB: CPU tensors live at once "
        "in training, above the loaded model (`genreg.profiling.tensor_peak`).",
        "",
        "| row | trainable | s/step | peak RSS MiB (above loaded) | peak tensor MiB | CUDA peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        cuda = f"{r['cuda_peak_mib']:.0f}" if "cuda_peak_mib" in r else "-"
        lines.append(
            f"| {name} | {r['trainable']:,} | {r['seconds_per_step']:.1f} | {r['peak_rss_mib']:.0f} "
            f"({r['peak_rss_above_loaded_mib']:.0f}) | {r['peak_tensor_mib']:.0f} | {cuda} |"
        )
    ratio = rows["sara"]["peak_tensor_mib"] / rows["lora"]["peak_tensor_mib"]
    lines += ["", f"SaRA's peak of live tensors is {ratio:.2f}x LoRA's."]
    (RESULTS / "sara_sd15_memory.md").write_text("\n".join(lines) + "\n")


def write_results(args, rows: dict, threshold: float, count: int, command: str, note: str = "") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("row", "kit")}
    result = {"settings": settings, "command": command, "threshold": threshold, "lora_trainable": count, "rows": rows}
    if note:
        result["note"] = note
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    base = rows.get("base", {}).get("retained_all_correct")
    lines = [
        f"# SaRA vs LoRA vs full fine-tuning: learning the held-out {args.concept!r}",
        "",
        f"`{command}`{f' ({note})' if note else ''}; {args.steps} steps, batch {args.batch_size}, "
        f"kit of {args.kit_size} renders; SaRA threshold {threshold:.3g} (as many weights as LoRA rank "
        f"{args.lora_rank}: {count:,}); {args.eval_prompts} prompts naming the concept, {args.retain_prompts} "
        f"standard single-object prompts, {args.images_per_prompt} image(s) each; 25 DDIM steps, guidance 5. Peak "
        "tensor MiB: CPU tensors live at once in training, above the loaded model (`genreg.profiling.tensor_peak`, "
        "the CPU's counterpart of CUDA's peak allocated), where measured."
        + (
            f" Every trained row was trained with seeds {', '.join(map(str, args.train_seeds))} on the same kit and "
            "scored on the same prompts and images' seeds: its scores are the mean and (range) of those runs."
            if args.train_seeds and len(args.train_seeds) > 1
            else ""
        ),
        "",
        "| row | learning rate | new value | new, all correct | retained all-correct | change vs base | trainable | "
        "s/step | peak RSS MiB (above loaded) | peak tensor MiB | saved MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        change = f"{100 * (r['retained_all_correct'] - base):+.1f} pts" if base is not None else ""
        extra = (
            f"{r['trainable']:,} | {r['seconds_per_step']:.3f} | {r['peak_rss_mib']:.0f} "
            f"({r['peak_rss_above_loaded_mib']:.0f}) | {r.get('peak_tensor_mib', float('nan')):.1f} | "
            f"{r['saved_bytes'] / 2**20:.2f}"
            if "trainable" in r
            else " | | | |"
        )
        lr = f"{r['learning_rate']:.2g}" if "learning_rate" in r else ""
        scores = " | ".join(cell(r, score) for score in SCORES)
        lines.append(f"| {name} | {lr} | {scores} | {change} | {extra} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
