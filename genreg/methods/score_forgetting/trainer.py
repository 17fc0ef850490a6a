"""Score Forgetting Distillation on the shared training loop: per step one update of the fake score network psi, then
one of the one-step generator theta (the official order), both initialised from the frozen teacher (or theta from an
earlier run's generator, ``generator_init``, as the official SD run starts it from SiD's), from prompts alone.
Forwards run on the unwrapped networks (psi's input gradient is needed in theta's step while its weights stay out of
it), and gradients are averaged over processes by hand, so two processes equal one with the global batch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...io import atomic_write
from ...training import TrainConfig, fit, process_state
from .config import SFDConfig, prompt_sets
from .losses import fake_score_loss, generate, noised, sid_generator_loss, timestep_of_sigma, x0_prediction

FAKE_DROP = 0.1  # share of the fake network's training prompts dropped to "", so it can be guided (SiD-LSG)


def check_model(pipe) -> None:
    """Refuses, before any work, a model without a text encoder (the method conditions on prompts) and SDXL.
    Concept words are checked with the prompts (``prompt_sets``): a tiny-world concept must be a value of the world;
    byte-level BPE tokenizers such as CLIP's encode any word, so a concept is never unknown to them."""
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise ValueError(
            "Score Forgetting Distillation needs a text-conditioned model with a text encoder and tokenizer"
        )
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("Score Forgetting Distillation supports SD 1.x/2.x models (one text encoder), not SDXL yet")


def initial_generator(folder: str, teacher: nn.Module, t_init: int) -> dict[str, torch.Tensor]:
    """The UNet weights of the one-step generator saved in ``folder`` (a ``OneStepPipeline`` folder), checked against
    the teacher's architecture and this run's t_init before any work."""
    from diffusers import UNet2DConditionModel

    index = Path(folder) / "model_index.json"
    config = json.loads(index.read_text()) if index.is_file() else {}
    if config.get("_class_name") != "OneStepPipeline":
        raise ValueError(
            f"generator_init {folder} is not a one-step generator: give the generator/ folder an earlier run wrote"
        )
    saved = config["t_init"]
    if saved != t_init:
        raise ValueError(
            f"generator_init {folder} was distilled at t_init {saved}, this run's sigma_init gives {t_init}: "
            "use that run's --sigma_init"
        )
    weights = UNet2DConditionModel.from_pretrained(Path(folder) / "unet").state_dict()
    expected = teacher.state_dict()
    if weights.keys() != expected.keys() or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise ValueError(f"generator_init {folder} holds another architecture than the teacher's UNet")
    return weights


class SFDObjective(nn.Module):
    """The generator G and fake score network psi (trained), the teacher phi and text encoder (frozen)."""

    def __init__(self, pipe, config: SFDConfig):
        super().__init__()
        self.config, self.scheduler = config, pipe.scheduler
        self.teacher, self.text_encoder = pipe.unet, pipe.text_encoder
        for module in (self.teacher, self.text_encoder, pipe.vae):
            module.requires_grad_(False)
        self.t_min, self.t_init, self.t_max = (
            timestep_of_sigma(pipe.scheduler, s) for s in (config.sigma_min, config.sigma_init, config.sigma_max)
        )
        self.generator = copy.deepcopy(self.teacher).requires_grad_(True)
        if config.generator_init:
            self.generator.load_state_dict(initial_generator(config.generator_init, self.teacher, self.t_init))
        self.fake = copy.deepcopy(self.teacher).requires_grad_(True)
        side = pipe.unet.config.sample_size
        self.latent_shape = (pipe.unet.config.in_channels, *((side, side) if isinstance(side, int) else side))

    def train_only(self, name: str | None) -> None:
        """Makes only ``name`` ("generator" or "fake") trainable; None: both (what checkpoints save)."""
        self.generator.requires_grad_(name in (None, "generator"))
        self.fake.requires_grad_(name in (None, "fake"))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def draws(self, seeds: torch.Tensor, shape) -> dict[str, torch.Tensor]:
        """Every random draw of a sample, from its seed: noises z, eps and timesteps t of each loss term."""
        out: dict[str, list] = {}
        for seed in seeds.tolist():
            g = torch.Generator().manual_seed(int(seed))
            for key in ("z", "eps"):
                out.setdefault(key, []).append(torch.randn(4, *shape, generator=g))
            out.setdefault("t", []).append(torch.randint(self.t_min, self.t_max, (4,), generator=g))
            out.setdefault("drop", []).append(torch.rand(2, generator=g) < FAKE_DROP)
        device = self.generator.device
        return {k: torch.stack(v, 1).to(device) for k, v in out.items()}  # (4, B, ...) per key

    def fake_loss(self, batch: dict) -> torch.Tensor:
        c, d = self.config, self.draws(batch["seed"], self.latent_shape)
        uncond = self.embed(batch["uncond_ids"])
        loss = torch.zeros((), device=uncond.device)
        for k, (name, weight) in enumerate((("remain_ids", c.remain_weight), ("forget_ids", c.forget_weight))):
            cond = self.embed(batch[name])
            with torch.no_grad():
                x_g = generate(self.generator, d["z"][k], cond, self.t_init, self.scheduler)
            if c.guidance_fake != 1:
                cond = torch.where(d["drop"][k].view(-1, 1, 1), uncond, cond)
            loss = loss + weight * fake_score_loss(self.fake, x_g, d["eps"][k], d["t"][k], cond, self.scheduler)
        return loss

    def generator_loss(self, batch: dict) -> torch.Tensor:
        c, d = self.config, self.draws(batch["seed"], self.latent_shape)
        uncond = self.embed(batch["uncond_ids"])
        remain, forget, override = (self.embed(batch[k]) for k in ("remain_ids", "forget_ids", "override_ids"))
        loss = torch.zeros((), device=uncond.device)
        # remain: teacher and fake both under the prompt; forget: G and fake under c_f, the teacher under c_o
        for k, (g_cond, real_cond, weight) in enumerate(
            ((remain, remain, c.remain_weight), (forget, override, c.forget_weight))
        ):
            x_g = generate(self.generator, d["z"][k + 2], g_cond, self.t_init, self.scheduler)
            t = d["t"][k + 2]
            x_t = noised(x_g, d["eps"][k + 2], t, self.scheduler).to(x_g.dtype)
            real = x0_prediction(self.teacher, x_t, t, (uncond, real_cond), c.guidance_teacher, self.scheduler)
            fake = x0_prediction(self.fake, x_t, t, (uncond, g_cond), c.guidance_fake, self.scheduler)
            loss = loss + weight * sid_generator_loss(real, fake, x_g, c.alpha)
        return loss


def _averaged_step(ctx, name: str, loss_of) -> torch.Tensor:
    """One update of optimizer ``name``: backward over the micro-batches on the unwrapped networks, gradients averaged
    over processes (NaN-free, clipped by norm when asked), then the step and its schedule."""
    core, accelerator, config = ctx.core, ctx.accelerator, ctx.config
    core.train_only(name)
    params = [p for p in getattr(core, name).parameters()]
    total = torch.zeros((), device=accelerator.device)
    for batch in ctx.micro_batches():
        with accelerator.autocast():
            loss = loss_of(batch) / config.gradient_accumulation_steps
        loss.backward()
        total += loss.detach()
    for p in params:
        if p.grad is not None:
            p.grad = torch.nan_to_num(accelerator.reduce(p.grad, "mean") if accelerator.num_processes > 1 else p.grad)
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    ctx.optimizers[name].step()
    ctx.schedules[name].step()
    ctx.optimizers[name].zero_grad(set_to_none=True)
    core.train_only(None)
    return total


def save_one_step_pipeline(pipe, generator: nn.Module, t_init: int, directory: Path) -> None:
    """A diffusers directory of ``OneStepPipeline`` (genreg.pipelines) with ``generator`` as its UNet."""
    from diffusers import StableDiffusionPipeline

    components = {k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "scheduler")}
    one_step = StableDiffusionPipeline(
        unet=generator, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **components
    )

    def write(tmp: Path) -> None:
        one_step.save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index |= {"_class_name": "OneStepPipeline", "t_init": t_init}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    atomic_write(directory, write)


def train_sfd(pipe, config: SFDConfig, train: TrainConfig, **fit_kwargs) -> Path:
    """Distils ``pipe`` into a one-step generator that draws ``config.override`` where prompts name ``config.forget``;
    returns the folder of the ``OneStepPipeline`` (``train.output_dir/generator``). ``pipe``'s weights are left as
    they were."""
    check_model(pipe)
    forget, override, remain = prompt_sets(config)
    objective = SFDObjective(pipe, config).to(pipe.device)
    tokenizer = pipe.tokenizer

    def ids(text: str) -> torch.Tensor:
        tokens = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        return torch.tensor(tokens.input_ids)

    def sample(step: int, index: int) -> dict:
        rng = np.random.default_rng([train.seed, step, index])
        f, r = int(rng.integers(len(forget))), int(rng.integers(len(remain)))
        return {
            "remain_ids": ids(remain[r]),
            "forget_ids": ids(forget[f]),
            "override_ids": ids(override[f]),
            "uncond_ids": ids(""),
            "seed": int(rng.integers(2**62)),
        }

    def optimizers(params, cfg: TrainConfig, lr: float) -> dict:
        def adam(module: nn.Module, rate: float) -> torch.optim.Optimizer:  # SiD's Adam: beta1 0, no weight decay
            return torch.optim.Adam(module.parameters(), lr=rate, betas=(0.0, cfg.adam_beta2), eps=cfg.adam_epsilon)

        return {
            "fake": adam(objective.fake, lr * config.fake_learning_rate),
            "generator": adam(objective.generator, lr),
        }

    def update(ctx) -> torch.Tensor:
        fake = _averaged_step(ctx, "fake", ctx.core.fake_loss)
        return fake + _averaged_step(ctx, "generator", ctx.core.generator_loss)

    run_settings = {"method": "score-forgetting", **dataclasses.asdict(config)}
    fit(objective, sample, train, optimizers=optimizers, update=update, settings=run_settings, **fit_kwargs)
    out = Path(train.output_dir) / "generator"
    if process_state().is_main_process:
        save_one_step_pipeline(pipe, objective.generator, objective.t_init, out)
    return out
