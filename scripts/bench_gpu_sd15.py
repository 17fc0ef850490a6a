"""Speed and memory at Stable Diffusion 1.5's real size (random weights, so no checkpoint is needed), on a GPU.

    python scripts/bench_gpu_sd15.py                      # CUDA, fp16, 512x512
    python scripts/bench_gpu_sd15.py --tiny --device cpu  # the same code on tiny components: a quick dry run

Three checks in one run, on one SD 1.5-size pipeline (UNet 860M, CLIP ViT-L/14 text encoder with a 49,408-row
vocabulary, the 4-level VAE):
- Adaptive Guidance vs CFG: images/s at 25 steps, batch --batch, CFG scale 7.5. AG's gamma_bar is calibrated on
  the timed prompts to spend --ag_nfe network evaluations per image (AG's mean on the bundled model), since a
  random network's cosine curve says nothing about a trained one's; CFG switched off at the same NFE and LinearAG
  (coefficients fitted on the same CFG trajectories) are timed beside it. Rounds interleave the policies.
- Guide-and-Rescale: seconds and peak GPU memory of one edit (--gar_steps steps) with the ``local`` preset's layers
  versus every attention layer recording (as the official code does), and inversion + CFG without recording.
- Cross Initialization: seconds for --ci_steps steps, batch 4, fp16 autocast, 512x512 subject images.
Writes <results_dir>/gpu_sd15.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from genreg.pipelines import AdaptiveGuidancePipeline
from transformers import CLIPTextConfig, CLIPTextModel

from genreg.guidance import CFG, FixedCutoff
from genreg.methods.adaptive_guidance import AdaptiveGuidance, LinearAG, calibrate, gamma_bar_for_nfe
from genreg.methods.cross_init import CrossInitConfig, train_cross_init
from genreg.sd import native_size
from genreg.testing import tiny_scheduler, tiny_sd_components
from genreg.tinyworld import render
from genreg.tinyworld.architecture import build_tokenizer
from genreg.tinyworld.subjects import SUBJECTS, write_kit
from genreg.tinyworld.world import caption, sample_scene
from genreg.training import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_guide_and_rescale import MEMORY_VARIANTS, edit_variant  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
CLIP_VOCAB = 49408


def sd15_components() -> dict:
    """Random-weight components with SD 1.5's configuration."""
    text = CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    return {
        "unet": UNet2DConditionModel(sample_size=64, cross_attention_dim=768),  # the other defaults are SD 1.x's
        "vae": vae,
        "text_encoder": CLIPTextModel(text),
        "tokenizer": build_tokenizer(77, vocab_size=CLIP_VOCAB),  # tiny-world BPE, padded to CLIP's size
        "scheduler": tiny_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured(device: torch.device, fn, *args, **kwargs) -> dict:
    """Runs ``fn(*args, **kwargs)``: its seconds and, on CUDA, its peak allocated bytes (in all, and above what was
    allocated before: the weights)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn(*args, **kwargs)
    sync(device)
    out = {"seconds": time.perf_counter() - start, "peak_bytes": None, "peak_above_weights_bytes": None}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        out |= {"peak_bytes": float(peak), "peak_above_weights_bytes": float(peak - before)}
    return out


def bench_guidance(pipe, prompts: list[str], args) -> dict:
    ag_pipe = AdaptiveGuidancePipeline.from_pipe(pipe)
    ag_pipe.set_progress_bar_config(disable=True)
    steps, scale = 25, 7.5
    gammas, coefficients = calibrate(ag_pipe, prompts, steps, scale, seed=0, batch_size=len(prompts))
    bar = gamma_bar_for_nfe(gammas["x0"], args.ag_nfe)
    policies = {
        "CFG": CFG,
        f"AG (gamma_bar {bar:.7f})": lambda: AdaptiveGuidance(gamma_bar=bar),
        f"CFG off after step {round(args.ag_nfe) - steps}": lambda: FixedCutoff(round(args.ag_nfe) - steps),
        "LinearAG": lambda: LinearAG(coefficients),
    }
    seconds = dict.fromkeys(policies, 0.0)
    nfe = {}

    def call(policy):
        generator = [torch.Generator().manual_seed(k) for k in range(len(prompts))]
        out = ag_pipe(
            prompts,
            guidance=policy,
            num_inference_steps=steps,
            guidance_scale=scale,
            generator=generator,
            output_type="np",
        )
        return out.nfe

    for make in policies.values():  # warm-up
        call(make())
    for _ in range(args.rounds):
        for name, make in policies.items():
            sync(args.device)
            start = time.perf_counter()
            nfe[name] = float(np.mean(call(make())))
            sync(args.device)
            seconds[name] += time.perf_counter() - start
    cfg_rate = args.rounds * len(prompts) / seconds["CFG"]
    rows = []
    for name in policies:
        rate = args.rounds * len(prompts) / seconds[name]
        rows.append({"method": name, "nfe": nfe[name], "images_per_s": rate, "speedup_vs_cfg": rate / cfg_rate})
    return {"steps": steps, "guidance_scale": scale, "batch": len(prompts), "rounds": args.rounds, "rows": rows}


def bench_gar(pipe, args) -> dict:
    scene = sample_scene(random.Random(7), n_objects=1)
    image = render(scene)[0].resize((args.resolution, args.resolution))
    prompts = (caption(scene, random.Random(0), background_p=1.0), "a blue square")
    common = {"guidance_scale": 7.5, "output_type": "latent"}
    for variant in MEMORY_VARIANTS:  # warm-up: 2 steps, one of them guided
        edit_variant(pipe, variant, image, prompts, **common | {"num_inference_steps": 2})
    rows = []
    for variant in MEMORY_VARIANTS:
        run = measured(
            args.device, edit_variant, pipe, variant, image, prompts, num_inference_steps=args.gar_steps, **common
        )
        rows.append({"variant": variant} | run)
    return {"steps": args.gar_steps, "source_prompt": prompts[0], "target_prompt": prompts[1], "rows": rows}


def bench_cross_init(pipe, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        kit = write_kit(
            next(iter(SUBJECTS.values())), Path(tmp) / "kit"
        )  # 64x64 renders, resized to the model's size by the loader
        config = CrossInitConfig(
            train_data_dir=str(kit), placeholder_token="<subject>", subject_class="tinyworld", flip_p=0.0
        )
        train = TrainConfig(
            output_dir=str(Path(tmp) / "out"),
            max_train_steps=args.ci_steps,
            train_batch_size=4,
            mixed_precision="fp16" if args.device.type == "cuda" else "no",
            checkpointing_steps=0,
            report_to="none",
        )
        times = {}
        start = time.perf_counter()
        train_cross_init(pipe, config, train, on_step=lambda step, loss: times.setdefault(step, time.perf_counter()))
        total = time.perf_counter() - start
    first = times[min(times)]
    steady = (times[max(times)] - first) / max(1, len(times) - 1)
    return {
        "steps": args.ci_steps,
        "batch": 4,
        "resolution": args.resolution,
        "seconds_total": total,
        "seconds_per_step_after_first": steady,
        "seconds_first_step": first - start,
    }


def markdown(results: dict) -> str:
    g, e, c = results["guidance"], results["gar"], results["cross_init"]

    def gib(n):
        return "n/a" if n is None else f"{n / 2**30:.2f}"

    lines = [
        "# Stable Diffusion 1.5-size speed and memory (random weights)",
        "",
        f"Device: {results['device_name']}; dtype {results['dtype']}; {results['resolution']}x{results['resolution']}"
        f"; torch {results['torch']}. Command: `{results['command']}`",
        "",
        f"## Adaptive Guidance vs CFG ({g['steps']} steps, CFG scale {g['guidance_scale']}, batch {g['batch']}, "
        f"{g['rounds']} interleaved rounds)",
        "",
        "| method | NFE per image | images/s | speed vs CFG |",
        "|---|---|---|---|",
        *(
            f"| {r['method']} | {r['nfe']:.1f} | {r['images_per_s']:.2f} | {r['speedup_vs_cfg']:.2f}x |"
            for r in g["rows"]
        ),
        "",
        f"## Guide-and-Rescale, one edit of {e['steps']} steps",
        "",
        "| variant | seconds | peak GPU memory (GiB) | peak above the weights (GiB) |",
        "|---|---|---|---|",
        *(
            f"| {r['variant']} | {r['seconds']:.2f} | {gib(r['peak_bytes'])} | {gib(r['peak_above_weights_bytes'])} |"
            for r in e["rows"]
        ),
        "",
        f"## Cross Initialization, {c['steps']} steps, batch {c['batch']}, {c['resolution']}x{c['resolution']}",
        "",
        f"{c['seconds_total']:.1f} s in all (first step {c['seconds_first_step']:.2f} s, then "
        f"{c['seconds_per_step_after_first'] * 1000:.0f} ms per step).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny random components instead of SD 1.5's size")
    parser.add_argument("--batch", type=int, default=4, help="images per AG/CFG call")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per guidance policy")
    parser.add_argument("--ag_nfe", type=float, default=36.7, help="AG's NFE per image to calibrate gamma_bar for")
    parser.add_argument("--gar_steps", type=int, default=50)
    parser.add_argument("--ci_steps", type=int, default=320)
    parser.add_argument("--results_dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    dtype = torch.float16 if args.device.type == "cuda" else torch.float32

    torch.manual_seed(0)
    start = time.perf_counter()
    with args.device:
        pipe = StableDiffusionPipeline(**(tiny_sd_components() if args.tiny else sd15_components()))
    pipe.to(args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    args.resolution = native_size(pipe)
    print(f"built the pipeline in {time.perf_counter() - start:.1f}s", flush=True)

    rng = random.Random(1)
    prompts = [caption(sample_scene(rng), rng) for _ in range(args.batch)]
    results = {
        "device_name": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else platform.processor(),
        "dtype": str(dtype).removeprefix("torch."),
        "resolution": args.resolution,
        "torch": torch.__version__,
        "command": "python scripts/bench_gpu_sd15.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "parameters": {
            name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "text_encoder", "vae")
        },
    }
    results["guidance"] = bench_guidance(pipe, prompts, args)
    print(json.dumps(results["guidance"], indent=1), flush=True)
    results["gar"] = bench_gar(pipe, args)
    print(json.dumps(results["gar"], indent=1), flush=True)
    results["cross_init"] = bench_cross_init(pipe, args)  # last: it adds the placeholder token to the pipeline
    print(json.dumps(results["cross_init"], indent=1), flush=True)

    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "gpu_sd15.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.results_dir / "gpu_sd15.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
