"""One accelerate-based training loop for every genreg trainer: methods plug in a loss module and a sampler, and
where they need it their own optimizers and update.

The objective is an ``nn.Module`` whose parameters with ``requires_grad`` are what is trained and whose
``forward(batch)`` returns the loss (EDM's loss callable). Sample ``i`` of optimizer step ``s`` is a pure function
``sample(s, i)`` of the global index, so a run split over N processes sees the same global batch as one process,
and a resumed run sees the same data and noise as an uninterrupted one.

By default one AdamW over every trainable parameter takes one gradient step per training step
(``gradient_step``). A method that owns its update passes ``optimizers`` (a factory of named optimizers, e.g. a
sparse one, or one per network) and ``update(ctx)`` (e.g. alternating generator and critic steps); checkpoints,
exact resume, mixed precision and data parallelism stay the loop's for every method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, set_seed
from diffusers.optimization import get_scheduler
from torch import nn
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from ..config import option
from .checkpoints import (
    DEFAULT_OPTIMIZER,
    list_checkpoints,
    load_checkpoint,
    load_latest_intact,
    resolve_checkpoint,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Settings every trainer shares; flag names follow diffusers' example scripts."""

    output_dir: str = option(
        "genreg-output", "where checkpoints, validation images and the result are written", place="hidden"
    )
    max_train_steps: int = option(320, "optimizer steps")
    train_batch_size: int = option(8, "samples per process per micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", place="advanced")
    learning_rate: float | None = option(
        5e-3, "peak learning rate (per sample of the global batch with --scale_lr); unset: the method's own rule"
    )
    scale_lr: bool = option(False, "multiply the learning rate by the global batch size", place="advanced")
    lr_scheduler: str = option("constant", "learning-rate schedule", choices=LR_SCHEDULERS, place="advanced")
    lr_warmup_steps: int = option(0, "warm-up steps of the schedule", place="advanced")
    adam_beta1: float = option(0.9, "AdamW beta1", place="advanced")
    adam_beta2: float = option(0.999, "AdamW beta2", place="advanced")
    adam_weight_decay: float = option(1e-2, "AdamW decoupled weight decay", place="advanced")
    adam_epsilon: float = option(1e-8, "AdamW epsilon", place="advanced")
    max_grad_norm: float = option(0.0, "clip the gradient norm to this (0 = no clipping)", place="advanced")
    mixed_precision: str = option("no", "autocast precision ('fp16' needs a GPU)", choices=PRECISIONS, place="hidden")
    checkpointing_steps: int = option(100, "write checkpoint-N/ every this many steps (0 = only at the end)")
    checkpoints_total_limit: int | None = option(None, "keep at most this many checkpoints", place="advanced")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint-N directory to continue from")
    validation_steps: int = option(0, "write validation images every this many steps (0 = never)", place="advanced")
    seed: int = option(0, "seed of the data order, noise and timesteps")
    report_to: str = option("tensorboard", "'tensorboard' (used when installed) or 'none'", place="advanced")

    def __post_init__(self):
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive whole number, got {getattr(self, name)!r}")
        for name in ("checkpointing_steps", "validation_steps", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.learning_rate is not None and not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("checkpoints_total_limit must be at least 1 (or unset for no limit)")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler {self.lr_scheduler!r} unknown; choose one of {', '.join(LR_SCHEDULERS)}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(PRECISIONS)}")


@dataclass
class FitResult:
    step: int  # the last completed optimizer step
    losses: list[float]  # mean loss of each step this call ran
    stopped: bool  # True when ``should_stop`` ended the run early (a checkpoint was written)


def process_state() -> PartialState:
    """This process's place in the run. Under ``torchrun`` without a GPU, accelerate needs ``cpu=True`` to see the
    other processes (MULTI_CPU over gloo); ``accelerate launch --cpu`` sets the same through its environment."""
    return PartialState(cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# Training settings that decide which data and noise a step sees and how it updates: a resumed run must keep them.
# The global batch (processes x batch x accumulation) decides the samples; how it is split does not.
RESUME_SETTINGS = ("seed", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps")


def run_settings(config: TrainConfig, global_batch: int, method: dict | None) -> dict:
    """What a checkpoint records of its run, to refuse resuming it as another."""
    train = {name: getattr(config, name) for name in RESUME_SETTINGS} | {"global_batch": global_batch}
    return json.loads(json.dumps({"train": train, "method": method or {}}))  # as a checkpoint reads it back


def check_run_settings(recorded: dict | None, run: dict, checkpoint: Path) -> None:
    """Refuses to resume ``checkpoint`` with settings other than its own, naming each and the fix."""
    if recorded is None:  # written before runs were recorded
        return
    differ = [
        f"{name}: {recorded[part].get(name)!r} there, {value!r} now"
        for part in ("train", "method")
        for name, value in run[part].items()
        if recorded.get(part, {}).get(name, value) != value
    ]
    if differ:
        raise ValueError(
            f"{checkpoint} was trained with other settings ({'; '.join(differ)}): resume it with the same flags, or "
            "start a new run in a new --output_dir"
        )


def adamw(params: list[nn.Parameter], config: TrainConfig, lr: float) -> dict[str, torch.optim.Optimizer]:
    """The default optimizer factory: one AdamW with the config's betas, decoupled weight decay and epsilon."""
    optimizer = torch.optim.AdamW(
        params,
        lr=lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    return {DEFAULT_OPTIMIZER: optimizer}


@dataclass
class StepContext:
    """What an update sees on one training step: the prepared model (``core`` unwrapped), optimizers and their
    learning-rate schedules by name, and ``micro_batches()``, this process's gradient-accumulation micro-batches."""

    step: int
    config: TrainConfig
    accelerator: Accelerator
    model: nn.Module
    core: nn.Module
    params: list[nn.Parameter]
    optimizers: dict[str, torch.optim.Optimizer]
    schedules: dict[str, Any]
    micro_batches: Callable[[], Iterator[dict[str, Any]]]


def gradient_step(
    ctx: StepContext,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    before_clip: Callable[[], None] | None = None,
) -> torch.Tensor:
    """The default update: backward over the micro-batches (gradients synchronised on the last), clipping, then
    every optimizer and schedule steps once. Returns this process's loss, summed over micro-batches.

    A method's ``extra_loss()`` (e.g. a penalty on its parameters) joins the last micro-batch's backward once per
    step; ``before_clip()`` may edit the gradients before clipping."""
    config, accelerator = ctx.config, ctx.accelerator
    step_loss = torch.zeros((), device=accelerator.device)
    for micro, batch in enumerate(ctx.micro_batches()):
        last = micro == config.gradient_accumulation_steps - 1
        # accelerate's prepare() already runs forward under autocast when mixed precision is on
        with contextlib.nullcontext() if last else accelerator.no_sync(ctx.model):
            loss = ctx.model(batch) / config.gradient_accumulation_steps
            if last and extra_loss is not None:
                loss = loss + extra_loss()
            accelerator.backward(loss)
        step_loss += loss.detach()
    if before_clip is not None:
        before_clip()
    if config.max_grad_norm > 0:
        accelerator.clip_grad_norm_(ctx.params, config.max_grad_norm)
    for name, optimizer in ctx.optimizers.items():
        optimizer.step()
        ctx.schedules[name].step()
        optimizer.zero_grad(set_to_none=True)
    return step_loss


def fit(
    objective: nn.Module,
    sample: Callable[[int, int], dict[str, Any]],
    config: TrainConfig,
    *,
    optimizers: Callable[[list[nn.Parameter], TrainConfig, float], dict[str, torch.optim.Optimizer]] = adamw,
    update: Callable[[StepContext], torch.Tensor] = gradient_step,
    export: Callable[[nn.Module, Path], None] | None = None,
    settings: dict | None = None,
    validate: Callable[[nn.Module, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    accelerator: Accelerator | None = None,
) -> FitResult:
    """Trains ``objective``'s trainable parameters; returns when ``max_train_steps`` is reached.

    ``sample(step, i)`` returns sample ``i`` of the global batch of optimizer step ``step`` (tensors and strings).
    ``settings`` (JSON-ready: the method and its config) are recorded in every checkpoint with the training settings
    that decide the data and the update; resuming with others is refused, as is a fresh run into an ``output_dir``
    that holds another run's checkpoints.
    ``optimizers(params, config, lr)`` builds the named optimizers (default: one AdamW); ``update(ctx)`` takes one
    training step and returns the loss (default: ``gradient_step``); each optimizer gets the config's schedule.
    ``export(objective, directory)`` adds the method's output files to each checkpoint; ``validate(objective, step)``
    runs every ``validation_steps``; ``should_stop()`` after each step (a checkpoint is written, so the run can be
    resumed).
    """
    tracker = "tensorboard" if config.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") else None
    accelerator = accelerator or Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=tracker,
        project_dir=config.output_dir,
        cpu=process_state().distributed_type == DistributedType.MULTI_CPU,
    )
    set_seed(config.seed)
    params = [p for p in objective.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the objective has no trainable parameters (none has requires_grad=True)")
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = config.train_batch_size * config.gradient_accumulation_steps * world
    if config.learning_rate is None:
        raise ValueError("learning_rate is unset and this method has no rule for it: pass --learning_rate")
    lr = config.learning_rate * (global_batch if config.scale_lr else 1)
    built = optimizers(params, config, lr)
    schedules = {
        name: get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_train_steps,
        )
        for name, optimizer in built.items()
    }
    model, *prepared = accelerator.prepare(objective, *built.values())
    opts = dict(zip(built, prepared, strict=True))
    core = accelerator.unwrap_model(model)

    start = 0
    run = run_settings(config, global_batch, settings)
    if config.resume_from_checkpoint == "latest":
        found = load_latest_intact(config.output_dir)
        checkpoint, loaded = found if found is not None else (None, None)
    else:
        checkpoint = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
        loaded = load_checkpoint(checkpoint) if checkpoint is not None else None
        earlier = list_checkpoints(config.output_dir) if checkpoint is None else []
        if earlier:
            raise ValueError(
                f"{config.output_dir} holds the checkpoints of an earlier run "
                f"({earlier[-1].name}): pass --resume_from_checkpoint latest to continue "
                "it, or choose a new --output_dir"
            )
    if checkpoint is not None:
        start, tensors, optimizer_states, meta = loaded
        check_run_settings(meta.get("run"), run, checkpoint)
        differ = set(trainable_state(core)) ^ set(tensors)
        if differ:
            raise ValueError(f"{checkpoint} does not match this objective (parameters differ: {sorted(differ)[:5]})")
        with torch.no_grad():
            for name, p in trainable_state(core).items():
                p.copy_(tensors[name])
        if set(optimizer_states) != set(opts):
            raise ValueError(f"{checkpoint} holds optimizers {sorted(optimizer_states)}, this run {sorted(opts)}")
        for name, optimizer in opts.items():
            optimizer.load_state_dict(optimizer_states[name])
        with warnings.catch_warnings():  # fast-forwarding the schedule without optimizer steps is intended here
            warnings.simplefilter("ignore", UserWarning)
            for schedule in schedules.values():
                for _ in range(start):
                    schedule.step()
        logger.info("resumed from %s at step %d", checkpoint, start)
    elif config.resume_from_checkpoint:
        logger.info("no checkpoint in %s yet: starting from step 0", config.output_dir)
    if tracker and accelerator.is_main_process:
        accelerator.init_trackers(
            "genreg", config={k: v for k, v in dataclasses.asdict(config).items() if v is not None}
        )

    def save(step: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(
                config.output_dir,
                step,
                trainable_state(core),
                {name: optimizer.state_dict() for name, optimizer in opts.items()},
                extra={"num_processes": world, "run": run},
                total_limit=config.checkpoints_total_limit,
                export=(lambda directory: export(core, directory)) if export is not None else None,
            )
        accelerator.wait_for_everyone()

    losses: list[float] = []
    stopped = False
    bar = tqdm(
        initial=start, total=config.max_train_steps, desc="training", disable=not accelerator.is_local_main_process
    )
    for step in range(start, config.max_train_steps):
        model.train()

        def micro_batches(step: int = step) -> Iterator[dict[str, Any]]:
            for micro in range(config.gradient_accumulation_steps):
                first = (micro * world + rank) * config.train_batch_size
                batch = default_collate([sample(step, first + j) for j in range(config.train_batch_size)])
                yield {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}

        step_loss = update(StepContext(step, config, accelerator, model, core, params, opts, schedules, micro_batches))
        done = step + 1
        mean_loss = accelerator.reduce(step_loss, "mean").item()
        losses.append(mean_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        if tracker:
            lrs = {
                "lr" if name == DEFAULT_OPTIMIZER else f"lr/{name}": schedule.get_last_lr()[0]
                for name, schedule in schedules.items()
            }
            accelerator.log({"loss": mean_loss, **lrs}, step=done)
        if on_step is not None:
            on_step(done, mean_loss)
        if validate is not None and config.validation_steps and done % config.validation_steps == 0:
            if accelerator.is_main_process:
                validate(core, done)
        stop = should_stop is not None and should_stop()
        if (
            stop
            or done == config.max_train_steps
            or (config.checkpointing_steps and done % config.checkpointing_steps == 0)
        ):
            save(done)
        if stop:
            stopped = True
            break
    bar.close()
    accelerator.end_training()
    return FitResult(step=start + len(losses), losses=losses, stopped=stopped)
