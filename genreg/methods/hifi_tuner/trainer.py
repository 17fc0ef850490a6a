"""HiFi Tuner's subject learning on the shared loop (Sec. 3.2): one shared set c_s under the masked diffusion loss and
the pull toward phi_s (Eqs. 5-6), then the step-wise refinement (Algorithm 1): for each sampling step, from the
first to the last, its set starts as the previous step's and takes I steps at exactly that step's timestep.

The step-wise stage trains all T sets as one (T, n, d) parameter; only the current row enters the loss, and each
row starts with fresh Adam moments (the optimizer's state is cleared at every row's first step), so a finished row
stays where its own steps left it. Both stages checkpoint and resume exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from ...adapters import fine_tune_unet
from ...diffusion import masked_mse, noised_batch
from ...training import StepContext, TrainConfig, fit, gradient_step, list_checkpoints, process_state
from .config import HiFiTunerConfig
from .subject import SUBJECT_FILE, HiFiSubject, check_free_tail, empty_tail, replace_last, scheduler_timesteps

logger = logging.getLogger(__name__)

STEPWISE_STAGE = "stepwise-stage"  # the step-wise stage's checkpoints, inside the run's output_dir


class SubjectObjective(nn.Module):
    """L_s(c_s) = ||M (eps_theta(x_t, [c, c_s]) - eps)||^2 + w_s ||c_s - phi_s||^2 (Eq. 6), over ``rows`` sets: a
    batch trains row ``batch["row"]`` (0 for the shared set) at its own timesteps or ``batch["timestep"]``."""

    def __init__(self, pipe, anchor: torch.Tensor, init: torch.Tensor, rows: int, config: HiFiTunerConfig):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.scheduler = pipe.unet, pipe.vae, pipe.text_encoder, pipe.scheduler
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
        self.register_buffer("anchor", anchor.float())  # phi_s
        self.vectors = nn.Parameter(init.float().expand(rows, -1, -1).clone())
        self.reg_weight, self.masked = config.reg_weight, config.mask_guidance

    def forward(self, batch: dict) -> torch.Tensor:
        row = int(batch["row"][0]) if "row" in batch else 0
        with torch.no_grad():
            caption = self.text_encoder(batch["input_ids"])[0]
        z_t, t, target = noised_batch(self.unet, self.vae, self.scheduler, batch, batch.get("timestep"))
        cond = replace_last(caption, self.vectors[row])
        pred = self.unet(z_t, t, cond.to(self.unet.dtype)).sample
        loss = masked_mse(pred, target, batch["mask"] if self.masked else None)
        if self.reg_weight:
            loss = loss + self.reg_weight * (self.vectors[row] - self.anchor).pow(2).sum()
        return loss


def row_update(steps_per_row: int):
    """The default update, each row's first step preceded by c_s^t <- c_s^{t+1} and fresh optimizer moments."""

    def update(ctx: StepContext) -> torch.Tensor:
        row, first = divmod(ctx.step, steps_per_row)
        if first == 0:
            with torch.no_grad():
                if row:
                    ctx.core.vectors[row] = ctx.core.vectors[row - 1]
            for optimizer in ctx.optimizers.values():
                optimizer.state.clear()
        return gradient_step(ctx)

    return update


def _check_data(pipe, config: HiFiTunerConfig):
    data = config.data(pipe)
    check_free_tail(pipe.tokenizer, data.prompts(config.words), config.num_vectors)
    if config.mask_guidance:
        empty = [i for i, item in enumerate(data.items) if not item.mask.any()]
        if empty:
            raise ValueError(f"the mask of image {empty[0]} is empty: white marks the subject in masks/<stem>.png")
    return data


def train_dreambooth(pipe, config: HiFiTunerConfig, train: TrainConfig, data, anchor, settings, **fit_kwargs) -> Path:
    """The DreamBooth variant: a copy of the UNet (whole or LoRA; then ``pipe.unet``) learns the subject named
    '<identifier> <subject word>' under the mask-weighted loss (Eq. 5). The subject file holds phi_s as its vectors
    ([c, phi_s] ~ c), so ``generate``, ``reference_guided`` and ``replace_subject`` run on the tuned pipeline as they
    are. Returns the subject file, or the newest checkpoint when stopped."""
    if train.learning_rate > 1e-3:
        raise ValueError(
            f"the DreamBooth variant tunes the UNet, and learning_rate {train.learning_rate} would wreck it: use "
            "DreamBooth's 5e-6 for the whole UNet, or 1e-4 with --lora_rank"
        )
    out = Path(train.output_dir)
    # A whole UNet's checkpoint holds it and its optimizer state: keep one unless told otherwise.
    stage = dataclasses.replace(train, checkpoints_total_limit=train.checkpoints_total_limit or 1)

    def sample(step: int, index: int) -> dict:
        return data.sample(pipe.tokenizer, stage.seed, step, index, config.words, config.mask_guidance)

    masked = config.mask_guidance
    tuned = fine_tune_unet(pipe, sample, stage, out, config.lora_rank, settings, masked, **fit_kwargs)
    if tuned is None:
        return list_checkpoints(out)[-1]
    path = out / SUBJECT_FILE
    if process_state().is_main_process:
        HiFiSubject(anchor, config.words, unet=tuned.name).save(path)
    return path


def train_hifi_tuner(pipe, config: HiFiTunerConfig, train: TrainConfig, should_stop=None, on_step=None, **fit_kwargs):
    """HiFi Tuner's subject: the shared set for ``max_train_steps``, then, with ``stepwise_steps``, one set per step
    of ``num_inference_steps`` sampling steps of ``pipe.scheduler``. Returns ``hifi_subject.safetensors`` in
    ``train.output_dir`` (:class:`HiFiSubject`; each checkpoint holds one too). ``on_step`` counts on across the
    stages; a stop skips the step-wise stage until the run is resumed."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("HiFi Tuner supports pipelines with one text encoder (SD 1.x/2.x), not SDXL yet")
    data = _check_data(pipe, config)
    anchor = empty_tail(pipe.text_encoder, pipe.tokenizer, config.num_vectors)
    kept = {k: v for k, v in dataclasses.asdict(config).items() if k != "train_data_dir"}  # the images may move
    settings = {"method": "hifi-tuner", **kept}
    if config.dreambooth:
        stops = {"should_stop": should_stop, "on_step": on_step}
        return train_dreambooth(pipe, config, train, data, anchor, settings, **stops, **fit_kwargs)
    word, masks = config.subject_word, config.mask_guidance
    stopped = [False]

    def stop() -> bool:
        stopped[0] = stopped[0] or (should_stop is not None and should_stop())
        return stopped[0]

    def run(objective: SubjectObjective, sample, stage: TrainConfig, result, **kwargs):
        def export(core: nn.Module, directory: Path) -> None:
            result(core.vectors.detach()).save(directory / SUBJECT_FILE)

        fit(objective.to(pipe.device), sample, stage, export=export, settings=settings, should_stop=stop, **kwargs)
        return result(objective.vectors.detach())

    shared = SubjectObjective(pipe, anchor, anchor, 1, config)
    subject = run(
        shared,
        lambda s, i: data.sample(pipe.tokenizer, train.seed, s, i, word, masks),
        train,
        lambda v: HiFiSubject(v[0].cpu(), word),
        on_step=on_step,
        **fit_kwargs,
    )
    out = Path(train.output_dir)
    if config.stepwise_steps and not stopped[0]:
        timesteps = scheduler_timesteps(pipe.scheduler, config.num_inference_steps)
        per_row = config.stepwise_steps
        logger.info("shared set done; the step-wise stage refines %d sets, %d steps each", len(timesteps), per_row)
        # one (T, n, d) parameter: AdamW's decay would move the finished rows too, so the stage has none
        stage = dataclasses.replace(
            train,
            output_dir=str(out / STEPWISE_STAGE),
            max_train_steps=len(timesteps) * per_row,
            adam_weight_decay=0.0,
            validation_steps=0,
            resume_from_checkpoint="latest" if train.resume_from_checkpoint else None,
        )

        def sample(step: int, index: int) -> dict:
            row = step // per_row
            fixed = {"row": row, "timestep": torch.tensor(timesteps[row])}
            return data.sample(pipe.tokenizer, stage.seed, step, index, word, masks) | fixed

        made_for = {"timesteps": timesteps, "num_inference_steps": config.num_inference_steps}
        made_for["scheduler"] = type(pipe.scheduler).__name__

        def result(vectors: torch.Tensor, shared: HiFiSubject = subject) -> HiFiSubject:
            return dataclasses.replace(shared, step_vectors=vectors.cpu(), **made_for)

        objective = SubjectObjective(pipe, anchor, subject.vectors, len(timesteps), config)
        offset = train.max_train_steps
        counted = None if on_step is None else (lambda step, loss: on_step(offset + step, loss))
        stepwise = run(objective, sample, stage, result, update=row_update(per_row), on_step=counted, **fit_kwargs)
        if stopped[0]:  # an unfinished step-wise set is not a result: its checkpoint resumes it
            logger.info("stopped in the step-wise stage: %s holds the shared set only", SUBJECT_FILE)
        else:
            subject = stepwise
    path = out / SUBJECT_FILE
    if process_state().is_main_process:
        subject.save(path)
    return path
