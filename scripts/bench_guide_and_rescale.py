"""Benchmarks Guide-and-Rescale against inversion + CFG and SDEdit on rendered tiny-world edits (bundled model).

    python scripts/bench_guide_and_rescale.py [--edits 120] [--steps 50] [--seed 2026] [--results_dir bench/results]
        [--gar_variants 'local --self-attn-scale 0' ...]

Edits (``genreg.tinyworld.edits``): recolour one object, change one object's shape, change the background, in one-
and two-object scenes, balanced; the source image is a render (not a generated image) and the renderer gives the
ground truth. Rows, all with the same DDIM steps and guidance scale, every edit run by every row in turn:
DDIM inversion (source prompt) + target prompt with plain CFG (the first baseline); the same with CFG against the
source prompt instead of the empty one (negative-prompt inversion); SDEdit (img2img) at two strengths; GaR with each
preset, and with each --gar_variants setting (a preset and `genreg edit` flags, e.g. `--inversion negative-prompt`).
Every GaR row is checked against the issue's bar (success >= 90%; preservation >= 80% of the no-CFG reconstruction
ceiling on named cases, 60% on unnamed; 15 points above every baseline; 3 of 4 drawn shapes).
Columns: edit success (the evaluator reads the target value of the edited attribute); preservation (every other
attribute of every object, named and unnamed, the object count and the background, read against the target scene);
PSNR of the pixels outside the edit region against the source; seconds per edit relative to the first baseline.
Memory: peak memory of one GaR edit recording only its selected attention layers versus recording every attention
layer, each in a fresh process. Writes <results_dir>/<name>.{json,md} (--name, default guide_and_rescale).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from tqdm import tqdm

from genreg import load_pipeline
from genreg.attention import AttentionRecorder, recording, select_layers
from genreg.config import add_arguments, given
from genreg.inversion import ddim_scheduler
from genreg.methods.guide_and_rescale import PRESETS, GuideAndRescaleConfig, edit
from genreg.sd import decode_latents, encode_image
from genreg.tinyworld import Evaluator, render
from genreg.tinyworld.edits import (
    EDIT_KINDS,
    EditCase,
    edit_region,
    edit_success,
    masked_psnr,
    preservation,
    sample_edits,
)
from genreg.tinyworld.world import POSITION_PHRASES

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
BASELINE = "DDIM inversion + CFG"
NPI_BASELINE = "negative-prompt inversion + CFG"
# GaR with both guider scales at 0 is DDIM inversion + plain CFG exactly, against the empty prompt or, with
# negative-prompt inversion, against the source prompt (tests/test_guide_and_rescale.py).
NO_GUIDER = {"self_attn_scale": 0.0, "feature_scale": 0.0}


def to_uint8(images) -> np.ndarray:
    """The first image of a pipeline's "np" output as uint8 (H, W, 3)."""
    return (np.asarray(images[0]) * 255).round().clip(0, 255).astype(np.uint8)


def editors(
    pipe, args, inverted: dict[int, torch.Tensor], variants: dict[str, tuple[str, dict]]
) -> dict[str, Callable[[int, EditCase, object, int], np.ndarray]]:
    """Row name -> f(case number, case, source image, steps) -> edited uint8 image. The inversion and GaR
    rows keep each case's inverted latent z_N in ``inverted``."""
    w = args.guidance_scale
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe, scheduler=ddim_scheduler(pipe.scheduler))
    img2img.set_progress_bar_config(disable=True)

    def sdedit(strength):
        def run(k, case, image, steps):
            generator = torch.Generator().manual_seed(args.seed * 100_003 + k)
            out = img2img(
                case.target_prompt,
                image=image,
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=w,
                generator=generator,
                output_type="np",
            )
            return to_uint8(out.images)

        return run

    def gar(preset, changes=None):
        def run(k, case, image, steps):
            out = edit(
                pipe,
                image,
                case.source_prompt,
                case.target_prompt,
                preset=preset,
                num_inference_steps=steps,
                output_type="np",
                **(changes or {}) | {"guidance_scale": w},
            )
            inverted[k] = out.inverted[-1]  # the same in every row: the inversion does not depend on the settings
            return to_uint8(out.images)

        return run

    rows = {
        BASELINE: gar("local", NO_GUIDER | {"inversion": "ddim"}),
        NPI_BASELINE: gar("local", NO_GUIDER | {"inversion": "negative-prompt"}),
    }
    rows |= {f"SDEdit, strength {s:g}": sdedit(s) for s in args.sdedit_strengths}
    rows |= {f"GaR {p}": gar(p) for p in args.presets}
    rows |= {f"GaR {spec}": gar(preset, changes) for spec, (preset, changes) in variants.items()}
    return rows


def gar_variant(spec: str) -> tuple[str, dict]:
    """``"local --guided-fraction 1"`` -> ("local", {"guided_fraction": 1.0}): a preset and changes, in the flags
    of ``genreg edit``."""
    parser = argparse.ArgumentParser(prog="--gar_variants", add_help=False, exit_on_error=False)
    parser.add_argument("preset", choices=tuple(PRESETS))
    add_arguments(parser, GuideAndRescaleConfig, dashes=True, unset_is_none=True)
    try:
        ns, unknown = parser.parse_known_args(shlex.split(spec))
        if unknown:
            raise ValueError(f"unknown flag(s) {' '.join(unknown)}")
        changes = given(GuideAndRescaleConfig, ns)
        if "guidance_scale" in changes:
            raise ValueError("every row shares the bench's --guidance_scale; leave it out here")
        GuideAndRescaleConfig.preset(ns.preset, **changes)  # refuse bad settings before the run starts
    except (argparse.ArgumentError, ValueError) as err:
        raise SystemExit(f"--gar_variants {spec!r}: {err} (write a preset and `genreg edit` flags)") from None
    return ns.preset, changes


def unedited_label(w: float) -> str:
    """The reference row of the inverted source sampled back under its own prompt at guidance ``w`` (1: the
    reconstruction ceiling)."""
    return f"inversion + {'CFG' if w != 1 else 'no CFG'} under the source prompt, guidance {w:g} (no edit)"


def score(evaluator: Evaluator, images: np.ndarray, cases: list[EditCase], sources, regions) -> list[dict]:
    """Per edit: success, the preservation checks, and PSNR outside the edit region against the source."""
    out = []
    for case, reading, image, source, region in zip(
        cases, evaluator.read(images), images, sources, regions, strict=True
    ):
        checks = preservation(reading, case)
        out.append(
            {
                "success": edit_success(reading, case),
                "preserved": all(checks.values()),
                "failed_checks": [name for name, ok in checks.items() if not ok],
                "checks": checks,
                "psnr_outside": masked_psnr(image, source, ~region),
            }
        )
    return out


def summarize(edits: list[dict], seconds: list[float] | None, labels: list[str]) -> dict:
    def rates(items: list[dict]) -> dict:
        psnr = np.array([e["psnr_outside"] for e in items])
        return {
            "n": len(items),
            "success": float(np.mean([e["success"] for e in items])),
            "preserved": float(np.mean([e["preserved"] for e in items])),
            "success_and_preserved": float(np.mean([e["success"] and e["preserved"] for e in items])),
            # inf (identical pixels) only in the reference rows; the mean is then inf as well
            "psnr_outside": float(psnr.mean()),
            "psnr_outside_median": float(np.median(psnr)),
        }

    summary = rates(edits)
    groups = sorted(set(labels), key=lambda g: (EDIT_KINDS.index(g.split("/")[0]), g))
    summary["by_group"] = {g: rates([e for e, lab in zip(edits, labels, strict=True) if lab == g]) for g in groups}
    keys = sorted({k for e in edits for k in e["checks"]})
    summary["by_check"] = {k: float(np.mean([e["checks"][k] for e in edits if k in e["checks"]])) for k in keys}
    if seconds is not None:
        summary["seconds_per_edit"] = float(np.mean(seconds))
        summary["seconds"] = float(np.sum(seconds))
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# Edits of images the renderer did not draw


class DrawnEdit(NamedTuple):
    """A plain shape drawn with PIL (pure white ground, flat colour, no anti-aliasing, off the renderer's centres and
    radii) and a recolouring of it. Duck-types the prompts of an ``EditCase`` for the rows' editors."""

    shape: str
    color: str
    new_color: str
    box: tuple[int, int, int, int]  # left, top, right, bottom
    position: str
    rgb: tuple[int, int, int]

    @property
    def source_prompt(self) -> str:
        return f"a large {self.color} {self.shape} {POSITION_PHRASES[self.position][0]}"

    @property
    def target_prompt(self) -> str:
        return f"a large {self.new_color} {self.shape} {POSITION_PHRASES[self.position][0]}"

    def draw(self) -> tuple[PIL.Image.Image, np.ndarray]:
        image = PIL.Image.new("RGB", (64, 64), (255, 255, 255))
        draw = PIL.ImageDraw.Draw(image)
        left, top, right, bottom = self.box
        if self.shape == "circle":
            draw.ellipse(self.box, fill=self.rgb)
        elif self.shape == "square":
            draw.rectangle(self.box, fill=self.rgb)
        elif self.shape == "triangle":
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=self.rgb)
        elif self.shape == "diamond":
            mx, my = (left + right) / 2, (top + bottom) / 2
            draw.polygon([(mx, top), (right, my), (mx, bottom), (left, my)], fill=self.rgb)
        else:
            raise ValueError(f"no drawing for {self.shape!r}")
        return image, foreground(np.asarray(image), (255, 255, 255))


DRAWN_EDITS = (
    DrawnEdit("circle", "red", "blue", (5, 19, 29, 43), "left", (220, 40, 30)),
    DrawnEdit("square", "blue", "yellow", (37, 21, 58, 42), "right", (30, 60, 200)),
    DrawnEdit("triangle", "green", "red", (20, 3, 45, 27), "top", (40, 170, 60)),
    DrawnEdit("diamond", "purple", "orange", (19, 36, 44, 61), "bottom", (130, 50, 170)),
)


def foreground(image: np.ndarray, ground: tuple[int, int, int], threshold: float = 60.0) -> np.ndarray:
    """(H, W) bool: pixels farther than ``threshold`` (RGB distance) from the ground colour."""
    return np.linalg.norm(image.astype(np.float64) - np.asarray(ground, np.float64), axis=-1) > threshold


def score_drawn(evaluator: Evaluator, images: list[np.ndarray], edits=DRAWN_EDITS, min_iou: float = 0.7) -> dict:
    """Per drawn edit: recoloured (the evaluator reads the new colour on the object), its shape still read, and
    place and outline kept (the object's pixels against the drawing's: IoU >= ``min_iou``)."""
    out = []
    for case, image, reading in zip(edits, images, evaluator.read(np.stack(images)), strict=True):
        got = reading.objects.get(case.position) or next(iter(reading.objects.values()), None)
        drawn = case.draw()[1]
        # the edited image's ground is read from its border (the model may whiten or grey the paper)
        ground = tuple(np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]), axis=0))
        mask = foreground(image, ground)
        iou = float((mask & drawn).sum() / max((mask | drawn).sum(), 1))
        recoloured = got is not None and got["color"] == case.new_color
        out.append(
            {
                "edit": f"{case.color} {case.shape} -> {case.new_color}",
                "recoloured": recoloured,
                "shape_read": None if got is None else got["shape"],
                "iou": iou,
                "kept_and_recoloured": recoloured and iou >= min_iou,
            }
        )
    return {"edits": out, "kept_and_recoloured": sum(e["kept_and_recoloured"] for e in out)}


# ---------------------------------------------------------------------------------------------------------------------
# Peak memory of one edit, each variant in a fresh process


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Resets the process's peak resident set (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MEMORY_VARIANTS = (
    "inversion + CFG (no recording)",
    "GaR local, selected layers",
    "GaR local, every attention layer recording",
)


def edit_variant(pipe, variant: str, image, prompts: tuple[str, str], **common) -> None:
    """One edit as ``variant`` (of ``MEMORY_VARIANTS``) runs it: what the memory figures compare."""
    if variant == "inversion + CFG (no recording)":
        edit(pipe, image, *prompts, self_attn_scale=0.0, feature_scale=0.0, **common)
    elif variant == "GaR local, selected layers":
        edit(pipe, image, *prompts, preset="local", **common)
    elif variant == "GaR local, every attention layer recording":
        # The official code's way: the other layers keep their maps with gradient, one step's at a time.
        config = GuideAndRescaleConfig.preset("local")
        chosen = {
            layer.name for layer in select_layers(pipe.unet, "self", config.self_attn_blocks, config.self_attn_levels)
        }
        others = [layer for layer in select_layers(pipe.unet, "all") if layer.name not in chosen]
        extra = AttentionRecorder(keep="probs", grad=True)

        def drop_previous(module, inputs) -> None:
            extra.take()

        hook = pipe.unet.register_forward_pre_hook(drop_previous)
        try:
            with recording(pipe.unet, others, extra), extra.capture():
                edit(pipe, image, *prompts, preset="local", **common)
        finally:
            hook.remove()
    else:
        raise ValueError(f"unknown variant {variant!r}; choose one of {MEMORY_VARIANTS}")


def _memory_probe(variant: str, case: EditCase, model: str, steps: int, scale: float, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    pipe = load_pipeline(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    image = render(case.source)[0]
    prompts = (case.source_prompt, case.target_prompt)
    # A short guider-free edit first: thread pools and the forward passes' buffers stay out of the figure.
    edit_variant(
        pipe, MEMORY_VARIANTS[0], image, prompts, num_inference_steps=2, guidance_scale=scale, output_type="latent"
    )
    base = _status_kib("VmRSS")
    exact = _reset_peak()  # else the high-water mark of loading may hide the edit's peak (an upper bound then)
    start = time.perf_counter()
    edit_variant(pipe, variant, image, prompts, num_inference_steps=steps, guidance_scale=scale, output_type="latent")
    seconds = time.perf_counter() - start
    queue.put(((_status_kib("VmHWM") - base) * 1024, exact, seconds))


def peak_memory(variant: str, case: EditCase, args) -> dict:
    # Large freed blocks go straight back to the system, so the resident set follows the live tensors.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_memory_probe,
        args=(variant, case, args.model, args.steps, args.guidance_scale, args.threads, queue),
    )
    proc.start()
    peak, exact, seconds = queue.get()
    proc.join()
    return {"variant": variant, "peak_bytes": int(peak), "exact": bool(exact), "seconds": seconds}


# ---------------------------------------------------------------------------------------------------------------------


def criteria(rows: dict[str, dict], gar: str, ceiling: float, named: bool, drawn_kept: int) -> list[tuple[str, bool]]:
    """The restated bar for a GaR row: success >= 90%; preservation >= 80% (named cases) or 60% (unnamed) of the
    reconstruction ceiling (inversion without CFG); >= 15 points more preserved than every baseline row at equal or
    better success; >= 3 of 4 drawn shapes recoloured with place and outline kept."""
    r = rows[gar]
    share = 0.80 if named else 0.60
    out = [
        (f"{gar}: edit success {r['success']:.1%} >= 90%", r["success"] >= 0.90),
        (
            f"{gar}: preservation {r['preserved']:.1%} >= {share:.0%} of the ceiling {ceiling:.1%} "
            f"({share * ceiling:.1%})",
            r["preserved"] >= share * ceiling,
        ),
    ]
    for name, b in rows.items():
        if name.startswith("GaR"):
            continue
        out.append(
            (
                f"{gar} vs {name}: preservation {r['preserved']:.1%} >= {b['preserved']:.1%} + 15 points, success "
                f"{r['success']:.1%} >= {b['success']:.1%}",
                r["preserved"] >= b["preserved"] + 0.15 and r["success"] >= b["success"],
            )
        )
    out.append((f"{gar}: drawn shapes recoloured, place and outline kept: {drawn_kept} of 4 >= 3", drawn_kept >= 3))
    return out


def json_safe(value):
    """``value`` with infinite floats (PSNR of identical pixels) written as the string "inf", so the file is JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def command_line(parser: argparse.ArgumentParser, args) -> str:
    """The command that reproduces this run: --edits, --steps, --seed, and every other flag not at its default."""
    words = [f"python scripts/{parser.prog}"]
    for name, value in vars(args).items():
        if name == "results_dir" or (name not in ("edits", "steps", "seed") and value == parser.get_default(name)):
            continue
        if isinstance(value, bool):
            words.append(f"--{'' if value else 'no-'}{name}")
        else:
            words.append(
                f"--{name} "
                + " ".join(
                    f"{v:g}" if isinstance(v, float) else shlex.quote(str(v))
                    for v in (value if isinstance(value, list) else [value])
                )
            )
    return " ".join(words)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edits", type=int, default=120, help="number of edits (balanced over 3 kinds x 1-2 objects)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of every row (inversion and editing)")
    p.add_argument("--seed", type=int, default=2026, help="seed of the edit cases and of SDEdit's noise")
    p.add_argument("--guidance_scale", type=float, default=5.0, help="CFG scale of every row")
    p.add_argument("--sdedit_strengths", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--presets", nargs="+", default=["local", "style"], help="GaR presets, one row each")
    p.add_argument(
        "--gar_variants",
        nargs="+",
        default=[],
        metavar="SPEC",
        help="more GaR rows, each a preset and `genreg edit` flags, e.g. 'local --guided-fraction 1'",
    )
    p.add_argument(
        "--named_details",
        action="store_true",
        help="the prompts also name every object's pattern and outline (default: left to the model, as a user's"
        " prompt leaves a photo's details)",
    )
    p.add_argument("--grow", type=int, default=1, help="pixels the edit region is grown by (anti-aliased edges)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory")
    p.add_argument("--model", default="tinyworld")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results_dir", type=Path, default=RESULTS)
    p.add_argument("--name", default="guide_and_rescale", help="results file stem: <results_dir>/<name>.{json,md}")
    p.add_argument(
        "--examples", type=int, default=0, help="save the first N edits as a grid (guide_and_rescale_examples.png)"
    )
    args = p.parse_args()
    if args.edits < 1 or args.steps < 2:
        p.error("--edits must be >= 1 and --steps >= 2")
    if not args.name or Path(args.name).name != args.name or args.name in (".", ".."):
        p.error(f"--name is a file stem inside --results_dir (e.g. guide_and_rescale_named), not {args.name!r}")
    variants = {spec: gar_variant(spec) for spec in args.gar_variants}  # refused before the model loads
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    evaluator = Evaluator.load()
    cases = sample_edits(args.edits, args.seed, details=args.named_details)
    labels = [c.label for c in cases]
    sources = [render(c.source)[0] for c in cases]
    source_arrays = np.stack([np.asarray(s) for s in sources])
    regions = [edit_region(c, args.grow) for c in cases]
    inverted: dict[int, torch.Tensor] = {}
    rows = editors(pipe, args, inverted, variants)

    for run in rows.values():  # first calls (thread pools, allocator) outside the timings
        run(0, cases[0], sources[0], 2)
    images = {name: [] for name in rows}
    seconds = {name: [] for name in rows}
    for k, (case, source) in enumerate(tqdm(list(zip(cases, sources, strict=True)), desc="edits")):
        for name, run in rows.items():  # interleaved, so load changes on the machine hit every row alike
            start = time.perf_counter()
            images[name].append(run(k, case, source, args.steps))
            seconds[name].append(time.perf_counter() - start)

    drawn_sources = [case.draw()[0] for case in DRAWN_EDITS]
    drawn = {
        name: score_drawn(
            evaluator,
            [
                run(len(cases) + i, case, source, args.steps)
                for i, (case, source) in enumerate(zip(DRAWN_EDITS, drawn_sources, strict=True))
            ],
        )
        for name, run in rows.items()
    }

    results, per_edit = {}, {}
    for name in rows:
        scored = score(evaluator, np.stack(images[name]), cases, source_arrays, regions)
        results[name] = summarize(scored, seconds[name], labels)
        per_edit[name] = scored
    base_seconds = results[BASELINE]["seconds_per_edit"]
    for r in results.values():
        r["time_vs_baseline"] = r["seconds_per_edit"] / base_seconds

    # References (not editors): the target render read back (the evaluator's ceiling); the source through the VAE
    # (what every latent-space row starts from: PSNR outside the edit region cannot beat it by much); and the
    # inverted latent sampled back under the *source* prompt (no edit asked), with the rows' CFG (what inversion +
    # CFG keeps when nothing is edited) and without (what the inversion itself keeps).
    sampler = StableDiffusionPipeline.from_pipe(pipe, scheduler=ddim_scheduler(pipe.scheduler))
    sampler.set_progress_bar_config(disable=True)
    with torch.no_grad():
        vae_round_trip = np.stack([to_uint8(decode_latents(pipe, encode_image(pipe, s), "np")) for s in sources])
        unedited = {
            w: np.stack(
                [
                    to_uint8(
                        sampler(
                            c.source_prompt,
                            latents=inverted[k],
                            num_inference_steps=args.steps,
                            guidance_scale=w,
                            output_type="np",
                        ).images
                    )
                    for k, c in enumerate(cases)
                ]
            )
            for w in dict.fromkeys((args.guidance_scale, 1.0))
        }
    target_renders = np.stack([np.asarray(render(c.target)[0]) for c in cases])
    reference_images = {
        "target render (ground truth)": target_renders,
        "source through the VAE (no edit)": vae_round_trip,
    } | {unedited_label(w): images for w, images in unedited.items()}
    references = {
        name: summarize(score(evaluator, images, cases, source_arrays, regions), None, labels)
        for name, images in reference_images.items()
    }

    memory = []
    if args.memory:
        memory = [peak_memory(v, cases[0], args) for v in MEMORY_VARIANTS]
    ceiling = references[unedited_label(1.0)]["preserved"]
    checks = [
        check
        for name in results
        if name.startswith("GaR")
        for check in criteria(results, name, ceiling, args.named_details, drawn[name]["kept_and_recoloured"])
    ]

    args.results_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "results_dir"}
    settings |= {"machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    settings["scheduler"] = dict(pipe.scheduler.config)
    (args.results_dir / f"{args.name}.json").write_text(
        json.dumps(
            json_safe(
                {
                    "settings": settings,
                    "rows": results,
                    "references": references,
                    "memory": memory,
                    "criteria": [{"check": c, "met": ok} for c, ok in checks],
                    "drawn_edits": drawn,
                    "edits": [
                        {
                            "label": c.label,
                            "source_prompt": c.source_prompt,
                            "target_prompt": c.target_prompt,
                            "source": c.source.to_dict(),
                            "target": c.target.to_dict(),
                            "rows": {
                                name: {k: v for k, v in per_edit[name][i].items() if k != "checks"}
                                | {"seconds": seconds[name][i]}
                                for name in rows
                            },
                        }
                        for i, c in enumerate(cases)
                    ],
                }
            ),
            indent=1,
        )
    )
    if args.examples > 0:
        columns = [source_arrays, target_renders, *(np.stack(images[name]) for name in rows)]
        grid = np.concatenate(
            [np.concatenate([c[i] for c in columns], axis=1) for i in range(min(args.examples, len(cases)))]
        )
        PIL.Image.fromarray(grid).save(args.results_dir / f"{args.name}_examples.png")
    md = markdown(command_line(p, args), args, results, references, memory, checks, pipe.scheduler.config, drawn)
    (args.results_dir / f"{args.name}.md").write_text(md)
    print(md)


def markdown(command: str, args, results, references, memory, checks, scheduler_config, drawn) -> str:
    groups = list(next(iter(results.values()))["by_group"])
    lines = [
        "# Guide-and-Rescale benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"`{args.model}` model ({scheduler_config.prediction_type}, {scheduler_config.timestep_spacing} DDIM "
        f"spacing), {args.edits} edits of rendered scenes (recolour / reshape "
        "one object / change the background, in one- and two-object scenes, balanced), "
        f"{args.steps} DDIM steps and guidance scale {args.guidance_scale:g} in every row; every edit runs through "
        f"every row in turn, on the CPU with {args.threads} threads. Success: the evaluator reads the target value. "
        "Preserved: it reads every other attribute of every object (named and unnamed), the object count and the "
        f"background as in the target scene. PSNR: pixels outside the edit region (grown by {args.grow} px) against "
        "the source render. Time: whole edit (inversion included) relative to the first row.",
        "",
        "| row | edit success | preserved | success and preserved | PSNR outside edit (dB) | s / edit | time vs "
        "first row |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['success']:.1%} | {r['preserved']:.1%} | {r['success_and_preserved']:.1%} "
            f"| {r['psnr_outside']:.2f} | {r['seconds_per_edit']:.2f} | {r['time_vs_baseline']:.2f} |"
        )
    lines += [
        "",
        "References (not editors): the target render (what a perfect edit would score), the source through the "
        "VAE (no edit), and the inverted source sampled back under the source prompt (no edit asked), with the "
        "rows' CFG and without CFG: what inversion itself keeps, and what CFG at this scale costs on this model.",
        "",
        "| reference | edit success | preserved | PSNR outside edit (dB) |",
        "|---|---|---|---|",
    ]
    for name, r in references.items():
        lines.append(f"| {name} | {r['success']:.1%} | {r['preserved']:.1%} | {r['psnr_outside']:.2f} |")
    lines += [
        "",
        "## By edit kind / objects in the scene: success, preserved, PSNR outside",
        "",
        "| row | " + " | ".join(f"{g} (n={results[BASELINE]['by_group'][g]['n']})" for g in groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for name, r in results.items():
        cells = [
            f"{r['by_group'][g]['success']:.0%} / {r['by_group'][g]['preserved']:.0%} / "
            f"{r['by_group'][g]['psnr_outside']:.1f}"
            for g in groups
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Edits of images the renderer did not draw",
        "",
        "Plain shapes drawn with PIL (pure white ground, flat colour, no anti-aliasing, off the renderer's centres "
        "and sizes), each recoloured with prompts that name only shape, colour, size and position. Kept: the "
        "evaluator reads the new colour and the object's pixels overlap the drawing's with IoU >= 0.7 (place and "
        "outline). Cells: recoloured / IoU / shape read.",
        "",
        "| row | kept and recoloured | " + " | ".join(e["edit"] for e in next(iter(drawn.values()))["edits"]) + " |",
        "|---|---|" + "---|" * len(DRAWN_EDITS),
    ]
    for name, d in drawn.items():
        cells = [f"{'yes' if e['recoloured'] else 'no'} / {e['iou']:.2f} / {e['shape_read']}" for e in d["edits"]]
        lines.append(f"| {name} | {d['kept_and_recoloured']} of {len(d['edits'])} | " + " | ".join(cells) + " |")
    checked = list(next(iter(results.values()))["by_check"])
    lines += [
        "",
        "## Preservation by check (share of edits where the evaluator reads it unchanged)",
        "",
        "| row | " + " | ".join(checked) + " |",
        "|---|" + "---|" * len(checked),
    ]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['by_check'][k]:.0%}" for k in checked) + " |")
    if memory:
        mib = 2**20
        selected = next(m for m in memory if m["variant"] == "GaR local, selected layers")
        every = next(m for m in memory if "every" in m["variant"])
        lines += [
            "",
            "## Peak memory of one edit (first case, fresh process each)",
            "",
            f"{args.steps} steps. Growth of the process's peak resident set over its level after loading the model "
            "and a short warm-up edit. Selected layers: the `local` preset's self-attention selection, recording "
            "queries and keys; every attention layer: in addition, every other attention layer records its "
            "probabilities with gradient, as the official code's patching does.",
            "",
            "| variant | peak (MiB) | seconds |",
            "|---|---|---|",
        ]
        for m in memory:
            bound = "" if m["exact"] else " (upper bound)"
            lines.append(f"| {m['variant']} | {m['peak_bytes'] / mib:.1f}{bound} | {m['seconds']:.1f} |")
        ratio = every["peak_bytes"] / max(selected["peak_bytes"], 1)
        lines += ["", f"Every attention layer recording / selected layers only: {ratio:.2f}x"]
    if args.examples > 0:
        lines += [
            "",
            f"Examples: `guide_and_rescale_examples.png`, the first {min(args.examples, args.edits)} edits, one a "
            "line: source, target render, then " + ", ".join(results) + ".",
        ]
    if checks:
        lines += ["", "## The issue's bar, for every GaR row", ""]
        lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
