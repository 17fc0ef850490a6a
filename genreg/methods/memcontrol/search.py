"""MemControl's outer search (Dutt et al., WACV 2025): an Optuna study, two objectives both minimised, over a binary
mask of the UNet's transformer blocks and the learning rate; each trial is a PEFT fine-tune on the shared loop scored
by memorization (Wen et al.'s text-conditional noise norm at noised training images, max or mean: the official
``max_norm``/``avg_norm``) and quality (Frechet distance between embeddings of generations for held-out captions and
of the held-out images). The study lives in RDB storage, so several worker processes can fill one study; the Pareto
front (masks, learning rates, metrics, trainable fraction) is written as JSON and PNG.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ...adapters import FAMILIES, LORA_MODULES, add_adapter, attention_blocks
from ...config import option
from ...diffusion import FineTuneObjective
from ...io import atomic_write_text
from ...metrics import frechet_distance, teacher_forced_noise_norm
from ...training import TrainConfig, fit
from ...training.data import ImageDataConfig, ImageFolder

logger = logging.getLogger(__name__)

SAMPLERS = ("nsga2", "tpe", "random")
QUALITIES = {"frechet": "frechet_distance", "accuracy": "error_rate"}  # quality objective -> its name
OBJECTIVES = ("memorization", "frechet_distance")  # the paper's pair (the default)
HEARTBEAT_SECONDS = 30
# The official code's PEFT baselines adapt the feed-forward layers beside the attention projections, and its
# "attention" family trains them too; on the tiny world, LoRA on the projections alone learnt a new colour 10-20
# points below full fine-tuning at any learning rate, with them it came within 4 (bench/results/memcontrol.md).
LORA_DEFAULT = "attention+ff"
LORA_MODULES_HELP = "LoRA's layers per selected block: the attention projections, or those and the feed-forward ones"


class TrialStopped(Exception):
    """``should_stop()`` turned true during a trial (training or scoring): the study records the trial as failed,
    since a copy cut short would be scored as if fully trained."""


@dataclass
class MemControlConfig(ImageDataConfig):
    """The fine-tuning set (captioned), the held-out set of the quality objective, and the search's settings."""

    validation_data_dir: str = option(
        "", "held-out captioned images: the quality objective's reference", place="hidden"
    )
    n_trials: int = option(10, "trials this worker runs (several workers may share one study)")
    sampler: str = option("tpe", "Optuna sampler", choices=SAMPLERS)
    family: str = option("lora", "adapter on the selected blocks", choices=FAMILIES)
    lora_rank: int = option(4, "LoRA rank", place="advanced")
    lora_modules: str = option(LORA_DEFAULT, LORA_MODULES_HELP, choices=tuple(LORA_MODULES), place="advanced")
    lr_min: float = option(1e-5, "lowest learning rate searched (log-uniform)", place="advanced")
    lr_max: float = option(1e-3, "highest learning rate searched", place="advanced")
    reduce: str = option("max", "memorization over the training set: max or mean", choices=("max", "mean"))
    quality: str = option(
        "frechet",
        "quality objective: frechet (Frechet distance of image embeddings, as the paper's FID) or accuracy (1 - the "
        "scorer's all-correct rate on the held-out captions; the tiny-world evaluator's by default)",
        choices=tuple(QUALITIES),
    )
    storage: str = option(
        "",
        "Optuna storage URL (any SQLAlchemy URL); empty: sqlite study.db in the output folder",
        place="hidden",  # a server's database: the app keeps each study in its run folder
    )
    study_name: str = option("memcontrol", "the study's name in the storage", place="advanced")

    def __post_init__(self):
        super().__post_init__()
        if not self.validation_data_dir:
            raise ValueError("validation_data_dir is empty: pass held-out captioned images for the quality objective")
        if not 0 < self.lr_min <= self.lr_max:
            raise ValueError(f"the learning-rate range must be 0 < lr_min <= lr_max, got {self.lr_min}, {self.lr_max}")
        if self.n_trials < 1:
            raise ValueError(f"n_trials must be at least 1, got {self.n_trials}")


def open_study(config: MemControlConfig, output_dir: str | Path, seed: int):
    """The study (created, or loaded to add trials), refusing a storage that cannot be opened or a study created
    with other objectives."""
    import optuna

    url = config.storage or f"sqlite:///{(Path(output_dir) / 'study.db').resolve()}"
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    try:
        # A worker's heartbeat marks its running trial; a trial whose worker died (no beat for the grace period) is
        # failed by the next worker to start and queued again, so a killed worker loses only its unfinished trial.
        with warnings.catch_warnings():  # Optuna marks heartbeats experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=2 * HEARTBEAT_SECONDS,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
            )
    except Exception as err:  # SQLAlchemy raises several kinds for a bad URL or an unreachable database
        raise ValueError(
            f"cannot open the study storage {url!r} ({err}); pass a SQLAlchemy URL, e.g. sqlite:///s.db"
        ) from None
    try:
        study = optuna.load_study(study_name=config.study_name, storage=storage)
    except KeyError:
        study = optuna.create_study(study_name=config.study_name, storage=storage, directions=["minimize"] * 2)
        study.set_user_attr("objectives", list(objectives(config)))
    # Seeded by --seed and the trials so far: a resumed run goes on instead of repeating itself (workers started
    # together need their own --seed).
    seed = seed + len(study.trials)
    study.sampler = {
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }[config.sampler]()
    if study.user_attrs.get("objectives") != list(objectives(config)) or len(study.directions) != 2:
        raise ValueError(
            f"study {config.study_name!r} in {url} was created with other objectives "
            f"({study.user_attrs.get('objectives')}); choose another --study_name"
        )
    # Trials compare only under one adapter and one memorization reduction.
    setup = adapter_setup(config) | {"reduce": config.reduce}
    recorded = study.user_attrs.get("setup")
    if recorded is None:
        study.set_user_attr("setup", setup)
    elif recorded != setup:
        raise ValueError(
            f"study {config.study_name!r} in {url} holds trials of {recorded}, this run asks for {setup}: pass the "
            "same --family, --lora_rank, --lora_modules and --reduce to add trials, or choose another --study_name"
        )
    return study


def objectives(config: MemControlConfig) -> tuple[str, str]:
    """The names of the study's two objectives, both minimised."""
    return OBJECTIVES[0], QUALITIES[config.quality]


def adapter_setup(config) -> dict:
    """The adapter a search or stage-2 config puts on the selected blocks (trials compare only under one)."""
    return {"family": config.family, "lora_rank": config.lora_rank, "lora_modules": config.lora_modules}


def tune_copy(pipe, data: ImageFolder, mask, config, train: TrainConfig, **fit_kwargs):
    """A pipeline over a copy of ``pipe``'s UNet whose mask-selected blocks carry ``config``'s adapter (see
    ``adapter_setup``), fine-tuned on ``data`` on the shared loop; returns it (in eval mode), its trainable count and
    the FitResult. ``pipe`` is left as it was."""
    tuned = type(pipe).from_pipe(pipe, unet=copy.deepcopy(pipe.unet))
    tuned.set_progress_bar_config(disable=True)
    trainable = add_adapter(tuned.unet, mask, config.family, config.lora_rank, config.lora_modules)
    result = fit(
        FineTuneObjective(tuned), lambda s, i: data.sample(pipe.tokenizer, train.seed, s, i), train, **fit_kwargs
    )
    tuned.unet.eval()
    return tuned, trainable, result


def run_trial(pipe, config: MemControlConfig, train: TrainConfig, mask, lr: float, quality: Callable, **fit_kwargs):
    """One inner fine-tune of a copy of ``pipe``'s UNet with the mask's adapters; returns (memorization, quality,
    trainable parameters, the fine-tuned pipeline). ``quality(generated, references, captions)`` is minimised."""
    data = config.read(pipe)
    train = dataclasses.replace(train, learning_rate=lr)
    tuned, trainable, result = tune_copy(pipe, data, mask, config, train, **fit_kwargs)
    if result.stopped:
        raise TrialStopped(f"stopped at step {result.step} of {train.max_train_steps}")
    held_out = ImageFolder(config.validation_data_dir, data.size, True, 0.0)
    return (
        *score(tuned, data, held_out, config, quality, fit_kwargs.get("should_stop")),
        trainable,
        tuned,
    )


def score(
    pipe,
    data: ImageFolder,
    held_out: ImageFolder,
    config: MemControlConfig,
    quality: Callable,
    should_stop: Callable[[], bool] | None = None,
):
    """(memorization, quality): the noise norm over every training image, reduced; ``quality(generated, references,
    captions)`` of one generation per held-out caption (seed k for caption k) against the held-out images.
    ``should_stop()`` is asked after every sampling step; true raises TrialStopped."""

    def check(pipe, step, timestep, tensors):
        if should_stop is not None and should_stop():
            raise TrialStopped(f"stopped while scoring, at sampling step {step + 1}")
        return tensors

    items = data.items
    ids = pipe.tokenizer(
        [item.caption or "" for item in items],
        padding="max_length",
        truncation=True,
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    pixels = torch.stack([item.pixels for item in items])
    norms = teacher_forced_noise_norm(pipe, pixels, ids, torch.arange(len(items)))
    memorization = float(norms.max() if config.reduce == "max" else norms.mean())
    captions = [item.caption or "" for item in held_out.items]
    generators = [torch.Generator().manual_seed(k) for k in range(len(captions))]
    generated = pipe(captions, num_inference_steps=25, generator=generators, callback_on_step_end=check).images
    references = [
        Image.fromarray(((item.pixels.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for item in held_out.items
    ]
    return memorization, quality(generated, references, captions)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both minimised)."""
    return [i for i, (a, b) in enumerate(points) if not any(c <= a and d <= b and (c, d) != (a, b) for c, d in points)]


def plot_pareto(points: list[tuple[float, float]], front: list[int], path: Path, size: int = 480) -> None:
    """A scatter of every trial (grey) and the front (red, joined), memorization across, quality up."""
    image = Image.new("RGB", (size, size), "white")
    draw, pad = ImageDraw.Draw(image), 48
    lows = [min(p[k] for p in points) for k in (0, 1)]
    spans = [(max(p[k] for p in points) - lows[k]) or 1.0 for k in (0, 1)]

    def place(p: tuple[float, float]) -> tuple[float, float]:
        fx, fy = ((p[k] - lows[k]) / spans[k] for k in (0, 1))
        return pad + fx * (size - 2 * pad), size - pad - fy * (size - 2 * pad)

    draw.line([(pad, pad), (pad, size - pad), (size - pad, size - pad)], fill="black")
    draw.text((size // 2 - 60, size - pad + 16), "memorization (lower: less)", fill="black")
    draw.text((4, 8), "Frechet distance (lower: better)", fill="black")
    for k, (low, span) in enumerate(zip(lows, spans, strict=True)):  # each axis' range
        for f in (0.0, 1.0):
            x, y = place((low + f * span, lows[1]) if k == 0 else (lows[0], low + f * span))
            draw.text((x - 12, y + 4) if k == 0 else (2, y - 6), f"{low + f * span:.3g}", fill="black")
    for i, p in enumerate(points):
        x, y = place(p)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill="red" if i in front else "grey")
    draw.line([place(points[i]) for i in sorted(front, key=lambda i: points[i])], fill="red", width=2)
    image.save(path)


def write_front(study, blocks: list[str], total: int, output_dir: Path) -> Path:
    """The Pareto front of the finished trials as ``pareto.json`` and ``pareto.png``; returns the JSON path."""
    names = study.user_attrs.get("objectives", OBJECTIVES)
    trials = [t for t in study.trials if t.values is not None and len(t.values) == 2]
    if not trials:
        raise ValueError("the study has no finished trial yet")
    points = [tuple(t.values) for t in trials]
    front = pareto_front(points)
    rows = [
        {
            "trial": t.number,
            "mask": [int(t.params[b]) for b in blocks],
            "learning_rate": t.params["learning_rate"],
            names[0]: t.values[0],
            names[1]: t.values[1],
            "trainable_fraction": t.user_attrs.get("trainable", 0) / total,
            "pareto": i in front,
        }
        for i, t in enumerate(trials)
    ]
    plot_pareto(points, front, output_dir / "pareto.png")
    return atomic_write_text(
        output_dir / "pareto.json",
        json.dumps({"blocks": blocks, "setup": study.user_attrs.get("setup"), "trials": rows}, indent=1),
    )


@functools.cache
def tinyworld_evaluator():
    from ...tinyworld import Evaluator

    return Evaluator.load()


def search_memcontrol(
    pipe,
    config: MemControlConfig,
    train: TrainConfig,
    embed: Callable | None = None,
    scorer: Callable | None = None,
    **kw,
) -> Path:
    """Runs ``config.n_trials`` trials of the study (shared with any other worker on its storage); writes the front.
    ``embed(images) -> (N, d)``: the Frechet objective's image embedding; ``scorer(images, prompts) -> float``: the
    accuracy objective's all-correct rate (default for both: the tiny-world evaluator's)."""
    if config.quality == "frechet":
        embed = embed or tinyworld_evaluator().embed

        def quality(generated, references, captions) -> float:
            return frechet_distance(embed(generated), embed(references))
    else:
        scorer = scorer or (lambda images, prompts: tinyworld_evaluator().score(images, prompts)["all_correct"])

        def quality(generated, references, captions) -> float:
            return 1.0 - scorer(generated, captions)

    blocks = attention_blocks(pipe.unet)
    if not blocks:
        raise ValueError("this UNet has no transformer blocks to choose from")
    total = sum(p.numel() for p in pipe.unet.parameters())
    output_dir = Path(train.output_dir)
    study = open_study(config, output_dir, train.seed)

    def objective(trial) -> tuple[float, float]:
        import optuna

        mask = [trial.suggest_categorical(block, [0, 1]) for block in blocks]
        lr = trial.suggest_float("learning_rate", config.lr_min, config.lr_max, log=True)
        if not any(mask):
            raise optuna.TrialPruned("the mask selects no block")
        run = dataclasses.replace(
            train, output_dir=str(output_dir / "trials" / f"trial-{trial.number}"), checkpointing_steps=0
        )
        memorization, value, trainable, _ = run_trial(pipe, config, run, mask, lr, quality, **kw)
        trial.set_user_attr("trainable", trainable)
        return memorization, value

    study.optimize(objective, n_trials=config.n_trials)
    return write_front(study, blocks, total, output_dir)
