"""The `genreg` command."""

from __future__ import annotations

import argparse
import sys
import time

from .config import add_arguments, given

DTYPES = ("float32", "float16", "bfloat16")
SPACES = ("x0", "epsilon", "v")


def _generate(args: argparse.Namespace) -> None:
    import torch

    from .checks import require_nonnegative, require_positive_int, require_prompts
    from .guidance import guided_call, make_guidance, stock_call
    from .io import image_grid, save_image
    from .models import load_pipeline

    prompts = require_prompts(args.prompts)
    require_positive_int("--steps", args.steps)
    require_positive_int("--images-per-prompt", args.images_per_prompt)
    require_nonnegative("--guidance-scale", args.guidance_scale)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype)
    policy = make_guidance(
        args.guidance, args.gamma_bar, args.guidance_space, args.min_cfg_steps, args.linear_ag_coefficients
    )
    start = time.perf_counter()
    out, nfe, _ = guided_call(
        stock_call(pipe),
        pipe,
        policy,
        prompts,
        negative_prompt=[args.negative_prompt] * len(prompts) if args.negative_prompt else None,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        num_images_per_prompt=args.images_per_prompt,
        generator=torch.Generator("cpu").manual_seed(args.seed),
    )
    images = out.images
    seconds = time.perf_counter() - start
    grid = image_grid(images, cols=args.images_per_prompt if len(prompts) > 1 else None)
    if args.display_scale > 1:
        grid = grid.resize((grid.width * args.display_scale, grid.height * args.display_scale), 0)
    path = save_image(grid, args.out)
    cfg_nfe = args.steps * (2 if args.guidance_scale > 1 else 1)
    mean_nfe = sum(nfe) / len(nfe)
    print(
        f"wrote {path} ({len(images)} images, {args.steps} steps, guidance {args.guidance}: "
        f"{mean_nfe:.1f} NFE per image vs {cfg_nfe} for CFG, {seconds:.1f}s)"
    )


def _evaluate(args: argparse.Namespace) -> None:
    from .io import load_image
    from .tinyworld import Evaluator

    images = [load_image(p) for p in args.images]
    prompts = args.prompt * len(images) if len(args.prompt) == 1 else args.prompt
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images and {len(args.prompt)} prompts: give one prompt, or one per image")
    evaluator = Evaluator.load()
    for path, reading in zip(args.images, evaluator.read(images), strict=True):
        objects = "; ".join(f"{pos}: {' '.join(a.values())}" for pos, a in reading.objects.items())
        print(f"{path}: {objects or 'no object'} ({reading.background} background)")
    scores = evaluator.score(images, prompts)
    print(" ".join(f"{k}={v:.3f}" for k, v in scores.items() if k != "n"))


def _train(args: argparse.Namespace) -> None:
    from .registry import run_trainer

    print(f"wrote {run_trainer(args.method, args)}")


def _edit(args: argparse.Namespace) -> None:
    import torch

    from .checks import require_positive_int
    from .io import save_image
    from .methods.guide_and_rescale import GuideAndRescaleConfig, check_prompts, edit
    from .models import load_pipeline

    check_prompts(args.source, args.target)
    require_positive_int("--steps", args.steps)
    require_positive_int("--display-scale", args.display_scale)
    changes = given(GuideAndRescaleConfig, args)
    GuideAndRescaleConfig.preset(args.preset, **changes)  # refuse bad settings before loading a model
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype)
    pipe.set_progress_bar_config(disable=not args.progress)
    start = time.perf_counter()
    out = edit(
        pipe, args.image, args.source, args.target, preset=args.preset, num_inference_steps=args.steps, **changes
    )
    seconds = time.perf_counter() - start
    image = out.images[0]
    if args.display_scale > 1:
        image = image.resize((image.width * args.display_scale, image.height * args.display_scale), 0)
    path = save_image(image, args.out)
    print(f"wrote {path} (Guide-and-Rescale, preset {args.preset}, {args.steps} steps, {seconds:.1f}s)")


def _ui(args: argparse.Namespace) -> None:
    import torch

    # The command sits above every layer, so it may start the app; the library itself never imports genreg.ui.
    from genreg.ui import launch

    dtype = getattr(torch, args.dtype) if args.dtype else None
    launch(args.model, host=args.host, port=args.port, device=args.device, dtype=dtype, runs_dir=args.runs_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genreg", description="Editing, personalization, fine-tuning and unlearning for diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from prompts and save them as one grid")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts; one grid row each")
    gen.add_argument(
        "--model", default="tinyworld", help="'tinyworld' (bundled), a diffusers directory, or a cached hub id"
    )
    gen.add_argument("--steps", type=int, default=25, help="number of denoising steps")
    gen.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument(
        "--guidance", choices=("cfg", "ag", "linear_ag"), default="cfg", help="CFG, Adaptive Guidance, or LinearAG"
    )
    gen.add_argument("--gamma-bar", type=float, default=0.99, help="AG: cosine threshold that ends CFG")
    gen.add_argument("--guidance-space", choices=SPACES, default="x0", help="AG: where the cosine is measured")
    gen.add_argument("--min-cfg-steps", type=int, default=1, help="AG: steps that always get CFG")
    gen.add_argument("--linear-ag-coefficients", default=None, help="LinearAG: coefficients JSON from calibration")
    gen.add_argument("--images-per-prompt", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default="genreg_grid.png", help="where the image grid is written")
    gen.add_argument("--display-scale", type=int, default=1, help="enlarge the grid by this factor (nearest pixel)")
    gen.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    gen.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on GPU, float32 on CPU")
    gen.set_defaults(func=_generate)

    ed = sub.add_parser(
        "edit", help="edit a real image with Guide-and-Rescale: describe it (--source) and the edit (--target)"
    )
    ed.add_argument("image", metavar="IMAGE", help="the image to edit (PNG, JPEG, WebP)")
    ed.add_argument("--source", required=True, help="a prompt describing the image as it is")
    ed.add_argument("--target", required=True, help="the same prompt, changed to describe the edited image")
    ed.add_argument("--out", default="genreg_edit.png", help="where the edited image is written")
    ed.add_argument("--preset", choices=("local", "style"), default="local", help="object edits or stylisation")
    ed.add_argument("--steps", type=int, default=50, help="DDIM steps (inversion and editing)")
    ed.add_argument(
        "--model", default="tinyworld", help="'tinyworld' (bundled), a diffusers directory, or a cached hub id"
    )
    ed.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    ed.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on GPU, float32 on CPU")
    ed.add_argument("--display-scale", type=int, default=1, help="enlarge the output by this factor (nearest pixel)")
    ed.add_argument("--progress", action="store_true", help="show a progress bar")
    from .methods.guide_and_rescale import GuideAndRescaleConfig

    add_arguments(ed, GuideAndRescaleConfig, dashes=True, unset_is_none=True)  # unset: the preset's value
    ed.set_defaults(func=_edit)

    ev = sub.add_parser("evaluate", help="read tiny-world images with the evaluator and score them against prompts")
    ev.add_argument("images", nargs="+", metavar="IMAGE")
    ev.add_argument("--prompt", action="append", required=True, help="the prompt; once, or once per image")
    ev.set_defaults(func=_evaluate)

    from .registry import TRAINERS, add_trainer_arguments

    train = sub.add_parser("train", help="train a method (personalization, fine-tuning, ...)")
    methods = train.add_subparsers(dest="method", required=True)
    for name, trainer in TRAINERS.items():
        method = methods.add_parser(name, help=trainer.help, description=trainer.help)
        add_trainer_arguments(method, name)
        method.set_defaults(func=_train)

    app = sub.add_parser("ui", help="start the web app (Generate, Edit, Personalize) and print its address")
    app.add_argument(
        "--model", default="tinyworld", help="'tinyworld' (bundled), a diffusers directory, or a cached hub id"
    )
    app.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    app.add_argument("--port", type=int, default=7860, help="port to serve on")
    app.add_argument("--runs-dir", default="genreg-runs", help="where training runs started in the app are kept")
    app.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    app.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on GPU, float32 on CPU")
    app.set_defaults(func=_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"genreg: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
