"""Probes what Guide-and-Rescale's guider does on the bundled model: its size before rescaling, and the energies it
is meant to lower.

    python scripts/probe_guide_and_rescale.py [--edits 12] [--steps 25] [--seed 2026] [--results_dir bench/results]

For each edit (the benchmark's cases, ``genreg.tinyworld.edits``) and each row (inversion + plain CFG, GaR `local`, and
each --variants setting), the edit runs once; on every guided step the probe records the guider's norm over the CFG
term's norm before the rescaling clamps it, and after every step it measures, with the source prompt as GaR's guiders
do, the self-attention energy (eq. 11) and the feature energy (eq. 12) on the `local` preset's layers between the
current latent and the inverted one at the same timestep. Energies are reported relative to the plain-CFG row
(geometric mean over edits): below 1 the guider keeps the sample closer to the inversion than CFG alone does. Writes
<results_dir>/guide_and_rescale_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from unittest import mock

import bench_guide_and_rescale as bench  # this folder's benchmark: its GaR-row flags and command line
import numpy as np
import torch
from tqdm import tqdm

import genreg.methods.guide_and_rescale as gar
import genreg.methods.guide_and_rescale.sampler as gar_sampler
from genreg import load_pipeline
from genreg.attention import AttentionRecorder, recording, select_layers
from genreg.inversion import ddim_scheduler
from genreg.sd import predict
from genreg.tinyworld import render
from genreg.tinyworld.edits import sample_edits

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
PLAIN = "inversion + CFG"


def energies_along(pipe, conditions, inverted, latents, timesteps) -> np.ndarray:
    """(self-attention energy, feature energy) of each latent after step i against the inversion at timestep i + 1,
    on the layers the `local` preset compares."""
    unet, n, local = pipe.unet, len(timesteps), gar.GuideAndRescaleConfig.preset("local")
    recorder = AttentionRecorder(keep="qk", grad=False)
    layers = select_layers(unet, "self", local.self_attn_blocks, local.self_attn_levels)
    feature_module = gar_sampler._submodule(unet, local.feature_layer)
    out = []
    with torch.no_grad(), recording(unet, layers, recorder), gar_sampler._OutputCapture(feature_module) as features:
        for i in range(n - 1):
            passes = []
            for z in (inverted[n - 1 - i], latents[i]):
                with recorder.capture(), features.capture():
                    predict(unet, z, timesteps[i + 1], [conditions.source])
                passes.append((recorder.take(), features.take()))
            (ref_attn, ref_feat), (cur_attn, cur_feat) = passes
            out.append(
                (float(gar.self_attention_energy(ref_attn, cur_attn)), float(gar.feature_energy(ref_feat, cur_feat)))
            )
    return np.array(out)


def probe(pipe, case, steps: int, w: float, changes: dict) -> tuple[np.ndarray, list[float]]:
    """One edit: energies after each step, and the guider / CFG-term norm ratio (before clamping) per guided step."""
    ratios, latents = [], []
    original = gar_sampler.guided_noise

    def observed(uncond, target, guider, w_, lower, upper):
        cfg_norm = (w_ * (target.float() - uncond.float())).norm()
        ratios.append(float(guider.float().norm() / cfg_norm) if cfg_norm > 0 else math.nan)
        return original(uncond, target, guider, w_, lower, upper)

    image = render(case.source)[0]
    with mock.patch.object(gar_sampler, "guided_noise", observed):
        out = gar.edit(
            pipe,
            image,
            case.source_prompt,
            case.target_prompt,
            num_inference_steps=steps,
            guidance_scale=w,
            output_type="latent",
            callback=lambda i, t, z: latents.append(z.detach().clone()),
            **changes,
        )
    conditions = gar.encode_conditions(pipe, case.source_prompt, case.target_prompt, image.height, image.width)
    scheduler = ddim_scheduler(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return energies_along(pipe, conditions, out.inverted, latents, scheduler.timesteps), ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edits", type=int, default=12)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=2026, help="seed of the edit cases (the benchmark's)")
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument(
        "--variants",
        nargs="*",
        default=["--self-attn-scale 0", "--rescale-upper 1", "--rescale-upper 10"],
        help="more GaR `local` rows, each as `genreg edit` flags",
    )
    p.add_argument("--model", default="tinyworld")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results_dir", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.edits < 1 or args.steps < 3:
        p.error("--edits must be >= 1 and --steps >= 3")
    torch.set_num_threads(args.threads)

    rows = {PLAIN: bench.NO_GUIDER, "GaR local": {}}
    rows |= {f"GaR local {spec}": bench.gar_variant(f"local {spec}")[1] for spec in args.variants}
    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    cases = sample_edits(args.edits, args.seed)
    energies = {name: [] for name in rows}
    ratios = {name: [] for name in rows}
    for case in tqdm(cases, desc="edits"):
        for name, changes in rows.items():
            e, r = probe(pipe, case, args.steps, args.guidance_scale, changes)
            energies[name].append(e)
            ratios[name].append(r)

    guided = gar.GuideAndRescaleConfig.preset("local").guided_steps(args.steps)
    plain = np.stack(energies[PLAIN])  # (edits, steps - 1, 2)
    shown = sorted({0, 1, 2, 4, guided // 2, guided - 1, args.steps - 2} & set(range(args.steps - 1)))
    results = {}
    for name in rows:
        rel = np.exp(np.log(np.stack(energies[name]) / plain).mean(0))  # geometric mean over edits
        raw = np.array(ratios[name])  # (edits, guided steps); no columns for the row without a guider
        results[name] = {
            "self_attention_energy_vs_cfg": rel[:, 0].tolist(),
            "feature_energy_vs_cfg": rel[:, 1].tolist(),
            "guider_over_cfg_norm_median": np.median(raw, axis=0).tolist() if raw.size else [],
        }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    command = bench.command_line(p, args)
    (args.results_dir / "guide_and_rescale_probe.json").write_text(
        json.dumps(
            {"settings": {k: str(v) for k, v in vars(args).items() if k != "results_dir"}, "rows": results}, indent=1
        )
    )
    lines = [
        "# Guide-and-Rescale probe: the guider's size and what it does to the energies",
        "",
        f"Command: `{command}`",
        "",
        f"`{args.model}` model, {args.edits} benchmark edits, {args.steps} DDIM steps ({guided} guided), guidance "
        f"{args.guidance_scale:g}. Energy after step i against the inversion at the same timestep, relative to "
        "inversion + plain CFG (geometric mean over edits; below 1 = closer to the inversion than CFG alone).",
        "",
        "| row | energy | " + " | ".join(f"after step {i}" for i in shown) + " |",
        "|---|---|" + "---|" * len(shown),
    ]
    for name, r in results.items():
        if name == PLAIN:
            continue
        for label, key in (("self-attention", "self_attention_energy_vs_cfg"), ("feature", "feature_energy_vs_cfg")):
            lines.append(f"| {name} | {label} | " + " | ".join(f"{r[key][i]:.2f}" for i in shown) + " |")
    lines += [
        "",
        "Guider norm / CFG term norm before the rescaling clamps it (median over edits; the range is "
        "[lower, upper] of the row, [0.33, 3] for `local`):",
        "",
        "| row | " + " | ".join(f"step {i}" for i in shown if i < guided) + " |",
        "|---|" + "---|" * len([i for i in shown if i < guided]),
    ]
    for name, r in results.items():
        if r["guider_over_cfg_norm_median"]:
            values = r["guider_over_cfg_norm_median"]
            lines.append(f"| {name} | " + " | ".join(f"{values[i]:.3g}" for i in shown if i < guided) + " |")
    (args.results_dir / "guide_and_rescale_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
