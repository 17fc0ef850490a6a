"""The `genreg` command, generated from the method registry: `generate` and `edit` from the sampler and the editor,
`train NAME` from every trainer, each flag from a config field (diffusers' spelling, dashed alias accepted)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import registry
from .config import add_arguments, from_namespace, given

DTYPES = ("float32", "float16", "bfloat16")
LOW_CONFIDENCE = 0.9  # fresh renders read at 0.96 or more
PRECISION_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "no": None}


def quiet_libraries() -> None:
    """Keeps diffusers' and transformers' notices and loading bars out of a plain command's output (errors still
    show; sampling and training keep their progress bars). Call before they are imported for the import-time ones."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights"; diffusers' bars are sampling's too


@contextmanager
def _quiet_loading(verbose: bool) -> Iterator[None]:
    """Hides diffusers' "Loading pipeline components" bar unless ``verbose`` (the sampling bar after it stays)."""
    import diffusers.utils.logging

    if not verbose:
        diffusers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers.utils.logging.enable_progress_bar()


def _load(args: argparse.Namespace):
    import torch

    from .models import load_pipeline

    dtype = getattr(torch, args.dtype) if args.dtype else None
    with _quiet_loading(args.verbose):
        return load_pipeline(args.model, device=args.device, dtype=dtype, config=args.model_config)


def _enlarged(image, scale: int):
    return image.resize((image.width * scale, image.height * scale), 0) if scale > 1 else image


def _sample(method: registry.Method, args: argparse.Namespace) -> None:
    from .checks import require_positive_int, require_prompts
    from .io import check_output_path, image_grid, save_image

    options = from_namespace(method.config, args)
    require_positive_int("--display-scale", args.display_scale)
    check_output_path(args.out)
    pipe = _load(args)
    result = method.run(pipe, options)
    prompts = require_prompts(options.prompt)
    grid = image_grid(result.images, cols=options.num_images if len(prompts) > 1 else None)
    path = save_image(_enlarged(grid, args.display_scale), args.out)
    print(f"wrote {path} ({result.summary})")


def _edit(method: registry.Method, args: argparse.Namespace) -> None:
    from .checks import require_positive_int
    from .io import check_output_path, save_image
    from .models import require_multi_step

    options = from_namespace(method.config, args)
    settings = given(method.settings, args) if method.settings else {}
    require_positive_int("--display-scale", args.display_scale)
    check_output_path(args.out, overwrite_of=args.image)
    if hasattr(method.settings, "preset"):  # refuse bad settings before loading a model
        method.settings.preset(options.preset, **settings)
    pipe = _load(args)
    require_multi_step(pipe, args.model, "`genreg edit`")
    pipe.set_progress_bar_config(disable=not args.progress)
    result = method.run(pipe, args.image, options, **settings)
    path = save_image(_enlarged(result.image, args.display_scale), args.out)
    print(f"wrote {path} ({result.summary})")


def add_trainer_arguments(parser: argparse.ArgumentParser, method: registry.Method) -> None:
    """Flags of a trainer: the model, the method's config and the shared training settings, diffusers' names."""
    from .training import TrainConfig

    parser.add_argument(
        "--pretrained_model_name_or_path",
        default="tinyworld",
        help="'tinyworld', a diffusers directory, a hub id, or a .safetensors single file (with --model_config)",
    )
    _model_config_flag(parser)
    parser.add_argument("--verbose", action="store_true", help="show the libraries' notices and loading bars")
    add_arguments(parser, method.config)
    add_arguments(parser, TrainConfig)
    parser.set_defaults(**method.train_defaults)


def run_trainer(method: registry.Method, args: argparse.Namespace) -> Path:
    """Builds the configs from parsed flags, loads the model on this process's device, and trains."""
    import torch

    from .models import load_pipeline, require_multi_step
    from .training import TrainConfig, process_state

    config = from_namespace(method.config, args)
    train = from_namespace(TrainConfig, args)
    # Frozen weights in the autocast precision (as diffusers' scripts do); trained vectors stay in float32.
    dtype = PRECISION_DTYPES[train.mixed_precision]
    with _quiet_loading(args.verbose):
        pipe = load_pipeline(
            args.pretrained_model_name_or_path,
            device=str(process_state().device),
            dtype=getattr(torch, dtype) if dtype else torch.float32,
            config=args.model_config,
        )
    require_multi_step(pipe, args.pretrained_model_name_or_path, f"`genreg train {method.name}`")
    pipe.set_progress_bar_config(disable=True)
    return method.run(pipe, config, train)


def trainer_main(name: str, argv: list[str] | None = None) -> None:
    """Entry point of ``scripts/train_<name>.py`` (runs under ``accelerate launch`` or ``torchrun``)."""
    import genreg.methods  # noqa: F401  (registers the methods)

    method = registry.get(name.replace("_", "-"), (*registry.TRAINING, "search"))
    parser = argparse.ArgumentParser(description=method.help)
    add_trainer_arguments(parser, method)
    print(f"wrote {run_trainer(method, parser.parse_args(argv))}")


def _generate_video(args: argparse.Namespace) -> None:
    import torch

    from .checks import require_positive_int
    from .video import check_video_path, clip_length, generate_video, load_video_pipeline, save_video

    for flag, value in (("num_frames", args.num_frames), ("num_inference_steps", args.num_inference_steps)):
        require_positive_int(flag, value)
    require_positive_int("--display-scale", args.display_scale)
    if any(not p.strip() for p in args.prompt):
        raise ValueError('a prompt is empty; describe the clip, e.g. "a red circle moving to the right"')
    if len(args.prompt) > 1 and args.method == "animatediff":
        raise ValueError("several prompts make a multi-prompt video: add --method cono")
    method = registry.get(args.method, "video") if args.method != "animatediff" else None
    settings = from_namespace(method.config, args) if method else None  # refused before loading the model
    if hasattr(settings, "check_video"):  # so is a length the method cannot draw (the adapter's config is enough)
        settings.check_video(len(args.prompt), args.num_frames, clip_length(args.motion_adapter))
    check_video_path(args.out)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    with _quiet_loading(args.verbose):
        pipe = load_video_pipeline(args.model, args.motion_adapter, device=args.device, dtype=dtype)
    sampling = {
        "num_frames": args.num_frames,
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "generator": torch.Generator().manual_seed(args.seed),
    }
    if method is None:
        frames = generate_video(pipe, args.prompt[0], context_stride=args.context_stride, **sampling).frames[0]
        long = args.num_frames > clip_length(pipe)
        how = f", FreeNoise windows of {clip_length(pipe)}" if long else ""
    else:
        from genreg.pipelines import CoNoPipeline  # the pipeline turns "ag" into a guidance policy

        out = CoNoPipeline.from_pipe(pipe)(args.prompt, guidance=args.guidance, settings=settings, **sampling)
        frames, how = out.frames[0], f", {method.title}: {out.nfe} network evaluations"
    path = save_video(frames, args.out, fps=args.fps, scale=args.display_scale)
    print(f"wrote {path} ({len(frames)} frames at {args.fps} fps{how})")


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
        doubt = " (low: this may not be a tiny-world scene)" if reading.confidence < LOW_CONFIDENCE else ""
        sure = f"confidence {reading.confidence:.2f}{doubt}"
        print(f"{path}: {objects or 'no object'} ({reading.background} background; {sure})")
    scores = evaluator.score(images, prompts)
    print(" ".join(f"{k}={v:.3f}" for k, v in scores.items() if k != "n"))


def _ui(args: argparse.Namespace) -> None:
    import torch

    # The command sits above every layer, so it may start the app; the library itself never imports genreg.ui.
    from genreg.ui import launch

    dtype = getattr(torch, args.dtype) if args.dtype else None
    launch(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=dtype,
        runs_dir=args.runs_dir,
        models=args.allow_model,
        model_switch=args.allow_model_switch,
        model_config=args.model_config,
    )


def _model_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model_config",
        "--model-config",
        default=None,
        help="when the model is a single-file .safetensors checkpoint: a local diffusers directory of the same "
        "architecture (e.g. the model's original repository folder) or 'tinyworld', for its configs and tokenizer",
    )


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="tinyworld", help="'tinyworld' (bundled), a diffusers directory, or a cached hub id"
    )
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on GPU, float32 on CPU")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' notices and loading bars")


def _output_flags(parser: argparse.ArgumentParser, default: str, what: str) -> None:
    parser.add_argument("--out", default=default, help=f"where the {what} is written")
    parser.add_argument("--display-scale", type=int, default=1, help=f"enlarge the {what} by this factor (nearest)")


def build_parser() -> argparse.ArgumentParser:
    import genreg.methods  # noqa: F401  (registers the methods)

    parser = argparse.ArgumentParser(
        prog="genreg", description="Editing, personalization, fine-tuning and unlearning for diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    for method in registry.methods("sampler"):
        cmd = sub.add_parser(method.command, help=method.help, description=method.help)
        add_arguments(cmd, method.config, dashes=True, positional=("prompt",))
        _model_flags(cmd)
        _model_config_flag(cmd)
        _output_flags(cmd, "genreg_grid.png", "image grid")
        cmd.set_defaults(func=lambda args, m=method: _sample(m, args))

    for method in registry.methods("editor"):
        cmd = sub.add_parser(method.command, help=method.help, description=method.help)
        cmd.add_argument("image", metavar="IMAGE", help="the image to edit (PNG, JPEG, WebP)")
        add_arguments(cmd, method.config, dashes=True)
        if method.settings is not None:  # unset: the preset's value
            add_arguments(cmd, method.settings, dashes=True, unset_is_none=True)
        _model_flags(cmd)
        _model_config_flag(cmd)
        _output_flags(cmd, "genreg_edit.png", "edited image")
        cmd.add_argument("--progress", action="store_true", help="show a progress bar")
        cmd.set_defaults(func=lambda args, m=method: _edit(m, args))

    video_methods = registry.methods("video")
    video = sub.add_parser(
        "generate-video",
        help="text-to-video with AnimateDiff: the image model and a motion adapter (GIF or MP4)",
        description="Text-to-video on stock AnimateDiff; longer than the adapter's clip, FreeNoise is used, or with "
        "--method: " + "; ".join(m.help for m in video_methods),
    )
    video.add_argument("prompt", nargs="+", help='e.g. "a red circle moving to the right"; several: one per segment')
    video.add_argument(
        "--method",
        choices=("animatediff", *(m.name for m in video_methods)),
        default="animatediff",
        help="animatediff: one clip, or FreeNoise when longer; a method for long and multi-prompt videos",
    )
    video.add_argument("--negative-prompt", "--negative_prompt", default=None)
    video.add_argument("--num-frames", "--num_frames", type=int, default=16)
    video.add_argument("--num-inference-steps", "--num_inference_steps", type=int, default=25)
    video.add_argument("--guidance-scale", "--guidance_scale", type=float, default=5.0)
    video.add_argument("--guidance", choices=("cfg", "ag"), default="cfg", help="per clip: CFG or Adaptive Guidance")
    video.add_argument("--seed", type=int, default=0)
    video.add_argument("--fps", type=int, default=8)
    video.add_argument(
        "--context-stride", "--context_stride", type=int, default=4, help="FreeNoise's window stride (long videos)"
    )
    video.add_argument(
        "--motion-adapter", "--motion_adapter", default="tinyworld", help="'tinyworld' (bundled) or a directory"
    )
    for method in video_methods:
        add_arguments(video, method.config, dashes=True)
    _model_flags(video)
    _output_flags(video, "genreg_video.gif", "video (.gif or .mp4)")
    video.set_defaults(func=_generate_video)

    ev = sub.add_parser("evaluate", help="read tiny-world images with the evaluator and score them against prompts")
    ev.add_argument("images", nargs="+", metavar="IMAGE")
    ev.add_argument("--prompt", action="append", required=True, help="the prompt; once, or once per image")
    ev.set_defaults(func=_evaluate)

    train = sub.add_parser("train", help="train a method (personalization, fine-tuning, ...)")
    trainers = train.add_subparsers(dest="method", required=True)
    for method in registry.methods(registry.TRAINING):
        cmd = trainers.add_parser(method.name, help=method.help, description=method.help)
        add_trainer_arguments(cmd, method)
        cmd.set_defaults(func=lambda args, m=method: print(f"wrote {run_trainer(m, args)}"))
    if registry.methods("search"):
        search = sub.add_parser("search", help="search a method's settings with inner training runs (MemControl)")
        searches = search.add_subparsers(dest="method", required=True)
        for method in registry.methods("search"):
            cmd = searches.add_parser(method.name, help=method.help, description=method.help)
            add_trainer_arguments(cmd, method)  # the inner runs' training flags, as a trainer's
            cmd.set_defaults(func=lambda args, m=method: print(f"wrote {run_trainer(m, args)}"))

    app = sub.add_parser("ui", help="start the web app and print its address")
    app.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    app.add_argument("--port", type=int, default=7860, help="port to serve on")
    app.add_argument("--runs-dir", default="genreg-runs", help="where training runs started in the app are kept")
    app.add_argument(
        "--allow-model",
        action="append",
        default=[],
        metavar="PATH_OR_NAME",
        help="a model the app may switch to besides --model and tinyworld (repeatable; needs --allow-model-switch)",
    )
    app.add_argument(
        "--allow-model-switch",
        action="store_true",
        help="let the app's users switch the shared model, for everyone, among the allowed ones (default: fixed)",
    )
    _model_flags(app)
    _model_config_flag(app)
    app.set_defaults(func=_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    if "--verbose" not in (sys.argv[1:] if argv is None else argv):
        quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"genreg: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
