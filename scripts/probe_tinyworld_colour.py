"""Probes where the bundled model loses a colour (by default orange, which its benchmark reads as yellow on small
objects): the VAE, the sampler, or the prompt's encoding. Writes bench/results/<--name>.{json,md}.

    python scripts/probe_tinyworld_colour.py [--colour orange] [--prompts 96]

- the VAE's round trip of renders of the colour (small and large): does the autoencoder keep it?
- sampling at 25 and 50 DDIM steps and at guidance 2, 5 and 9: does the sampler decide it?
- the prompt's encoding pushed away from its neighbours' (c + k (c - mean of the neighbours' encodings), the same
  prompt with the colour word swapped): is the text condition too weak?
- the distance between the encoded prompts of every two colours (the same scene words, mean over the prompts).
Every row reads the colour at the prompt's place, per size, and what it was read as when wrong.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shlex
import sys
from pathlib import Path

import torch
from bench_tinyworld import colour_by_size  # this folder's benchmark: the same reading

from genreg import load_pipeline
from genreg.sd import decode_latents, encode_image
from genreg.tinyworld import COLORS, HELD_OUT, POSITIONS, SHAPES, SIZES, Evaluator, Obj, Scene, render, scene_prompt

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
NEIGHBOURS = {"orange": ("yellow", "red"), "yellow": ("orange", "green"), "red": ("orange", "purple")}


def scenes_of(colour: str, n: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    shapes = [s for s in SHAPES if s not in HELD_OUT["shape"]]
    return [
        Scene(
            (
                Obj(
                    rng.choice(shapes),
                    colour,
                    SIZES[i % len(SIZES)],
                    rng.choice(POSITIONS),
                    pattern=rng.choice(("solid", "striped", "dotted")),
                    outline=rng.choice(["none", "outlined"]),
                ),
            ),
            background=rng.choice(["white", "black"]),
        )
        for i in range(n)
    ]


def draw(pipe, conditions: torch.Tensor, seed: int, steps: int = 25, guidance: float = 5.0) -> list:
    images = []
    for i in range(0, len(conditions), 48):
        chunk = conditions[i : i + 48]
        generators = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        images += pipe(
            prompt_embeds=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators
        ).images
    return images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tinyworld")
    p.add_argument("--colour", default="orange", choices=tuple(NEIGHBOURS))
    p.add_argument("--prompts", type=int, default=96, help="scenes of the colour, half small, half large")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--name", default="tinyworld_colour_probe", help="results file stem")
    args = p.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    evaluator = Evaluator.load()
    scenes = scenes_of(args.colour, args.prompts, args.seed)
    prompts = [scene_prompt(s) for s in scenes]

    def encode(colour: str) -> torch.Tensor:
        swapped = [prompt.replace(args.colour, colour) for prompt in prompts]
        return pipe.encode_prompt(swapped, pipe.device, 1, False)[0]

    with torch.no_grad():
        encoded = {colour: encode(colour) for colour in COLORS if colour not in HELD_OUT["color"]}
        renders = [render(s)[0] for s in scenes]
        trips = decode_latents(pipe, encode_image(pipe, renders))
    rows = {"VAE round trip of renders": colour_by_size(evaluator, trips, scenes)[args.colour]}
    for steps, guidance in ((25, 5.0), (50, 5.0), (25, 2.0), (25, 9.0)):
        images = draw(pipe, encoded[args.colour], args.seed, steps, guidance)
        rows[f"{steps} steps, guidance {guidance:g}"] = colour_by_size(evaluator, images, scenes)[args.colour]
    c = encoded[args.colour]
    away = c - sum(encoded[n] for n in NEIGHBOURS[args.colour]) / len(NEIGHBOURS[args.colour])
    for k in (0.5, 1.0):
        images = draw(pipe, c + k * away, args.seed)
        rows[f"encoding pushed from {' and '.join(NEIGHBOURS[args.colour])}, k = {k:g}"] = colour_by_size(
            evaluator, images, scenes
        )[args.colour]
    names = list(encoded)
    distances = {a: {b: float((encoded[a] - encoded[b]).flatten(1).norm(dim=1).mean()) for b in names} for a in names}

    command = shlex.join(["python", "scripts/probe_tinyworld_colour.py", *sys.argv[1:]])
    lines = [
        f"# Where the bundled model loses {args.colour}",
        "",
        f"`{command}`: {args.prompts} single-object scenes of the colour (half small, half large), one image each, "
        "25 DDIM steps and guidance 5 unless the row says otherwise; the colour read at the prompt's place.",
        "",
        "| row | " + " | ".join(f"{size}: {args.colour} read (n)" for size in SIZES) + " | wrong readings |",
        "|---|" + "---|" * len(SIZES) + "---|",
    ]
    for name, by_size in rows.items():
        cells = " | ".join(f"{by_size[size]['accuracy']:.3f} ({by_size[size]['n']})" for size in SIZES)
        wrong = collections.Counter()
        for size in SIZES:
            wrong.update(by_size[size]["wrong"])
        lines.append(f"| {name} | {cells} | {', '.join(f'{k} {v}' for k, v in wrong.most_common()) or '-'} |")
    lines += ["", "Distance between the encoded prompts (mean over the prompts, the colour word swapped):", ""]
    lines += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {a} | " + " | ".join(f"{distances[a][b]:.2f}" for b in names) + " |" for a in names]
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "settings": vars(args), "rows": rows, "distances": distances}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
