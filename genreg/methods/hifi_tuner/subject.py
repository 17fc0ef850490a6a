"""A HiFi Tuner subject: vectors in the text encoder's *output* space that replace a prompt encoding's last n
positions ([c, c_s], Eq. 6), optionally one set per sampling step (Eq. 7), and sampling with them through the stock
pipeline (``prompt_embeds`` plus the step-end callback that swaps in the next step's set).

The file (``hifi_subject.safetensors``) holds ``vectors`` (n, d), ``step_vectors`` (T, n, d) when step-wise, and
metadata: the space, the subject word, and for a step-wise set the sampling steps and timesteps it was made for.
It is not a token embedding: ``load_textual_inversion`` cannot read it (the vectors are encoder outputs, not input
rows); ``HiFiSubject.load`` and :func:`generate` do. The DreamBooth variant's file holds phi_s as its vectors (so
[c, phi_s] ~ c) and names the tuned UNet beside it, which loads with the standard tools
(``pipe.load_lora_weights(folder)`` or ``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...io import atomic_write

SUBJECT_FILE = "hifi_subject.safetensors"
SPACE = "text_encoder_output"


def replace_last(embeds: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """[c, c_s]: ``embeds`` (B, L, d) with its last n positions replaced by ``vectors`` (n, d)."""
    n = vectors.shape[0]
    return torch.cat([embeds[:, :-n], vectors.to(embeds).expand(embeds.shape[0], -1, -1)], dim=1)


def empty_tail(text_encoder, tokenizer, n: int) -> torch.Tensor:
    """phi_s: the last n positions of the empty prompt's encoding (the initial value and anchor of c_s)."""
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0][0, -n:].float().cpu()


def check_free_tail(tokenizer, prompts: list[str], n: int) -> None:
    """Refuses a prompt whose tokens reach the last n positions, which the subject's vectors overwrite."""
    room = tokenizer.model_max_length - n
    for prompt in prompts:
        length = len(tokenizer(prompt, truncation=False).input_ids)  # with the start and end tokens
        if length > room:
            raise ValueError(
                f"prompt {prompt!r} is {length} tokens, but the subject's {n} vectors take the last {n} of the "
                f"encoder's {tokenizer.model_max_length} positions: shorten it to {room} tokens or fewer"
            )


def scheduler_timesteps(scheduler, steps: int) -> list[int]:
    """The timesteps that ``scheduler`` samples at with ``steps`` steps (on a copy: the scheduler is not changed)."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps)
    return [int(t) for t in probe.timesteps]


@dataclass
class HiFiSubject:
    vectors: torch.Tensor  # c_s (n, d)
    subject_word: str
    step_vectors: torch.Tensor | None = None  # c_s^t (len(timesteps), n, d): row i is used at sampling step i
    timesteps: list[int] | None = None  # the timesteps the step-wise set was made for, in sampling order
    num_inference_steps: int | None = None  # ... with this many steps
    scheduler: str | None = None  # ... of this scheduler class
    unet: str | None = None  # DreamBooth variant: the tuned UNet beside the file ("unet" or the LoRA weights file)

    @property
    def num_vectors(self) -> int:
        return self.vectors.shape[0]

    def save(self, path: str | Path) -> Path:
        tensors = {"vectors": self.vectors.detach().float().cpu().contiguous()}
        meta = {"format": "genreg.hifi_tuner", "space": SPACE, "subject_word": self.subject_word}
        if self.unet:
            meta["unet"] = self.unet
        if self.step_vectors is not None:
            tensors["step_vectors"] = self.step_vectors.detach().float().cpu().contiguous()
            meta |= {"timesteps": json.dumps(self.timesteps), "scheduler": self.scheduler}
            meta["num_inference_steps"] = str(self.num_inference_steps)
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> HiFiSubject:
        """The subject in ``path`` (a run folder or its file)."""
        path = Path(path)
        if path.is_dir():
            path = path / SUBJECT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: pass a HiFi Tuner run folder or its {SUBJECT_FILE}")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("space") != SPACE or "vectors" not in f.keys():
                raise ValueError(
                    f"{path} is not a HiFi Tuner subject (no encoder-output vectors); a token embedding loads with "
                    "pipe.load_textual_inversion instead"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise ValueError(f"{path} holds NaN or infinite vectors: the file is damaged; train it again")
        stepwise = "step_vectors" in tensors
        return cls(
            tensors["vectors"],
            meta["subject_word"],
            tensors.get("step_vectors"),
            json.loads(meta["timesteps"]) if stepwise else None,
            int(meta["num_inference_steps"]) if stepwise else None,
            meta.get("scheduler"),
            meta.get("unet"),
        )

    def schedule(self, scheduler, steps: int | None, stepwise: bool = True) -> tuple[int, torch.Tensor]:
        """(sampling steps, the vectors of each step in sampling order): the step-wise set when there is one and
        ``stepwise``, refused for a step count or scheduler whose timesteps are not the ones it was made for;
        otherwise the shared vectors at every step."""
        if self.step_vectors is None or not stepwise:
            steps = steps or 50
            return steps, self.vectors.expand(len(scheduler_timesteps(scheduler, steps)), -1, -1)
        steps = steps or self.num_inference_steps
        if steps != self.num_inference_steps or scheduler_timesteps(scheduler, steps) != self.timesteps:
            raise ValueError(
                f"this subject's step-wise vectors were made for {self.num_inference_steps} steps of "
                f"{self.scheduler} (timesteps {self.timesteps[0]}..{self.timesteps[-1]}); sample with "
                f"num_inference_steps={self.num_inference_steps} and that scheduler, pass stepwise=False to use the "
                "shared vectors, or train the step-wise set again for this sampler"
            )
        return steps, self.step_vectors

    def prompt_embeds(self, pipe, prompts: list[str], vectors: torch.Tensor) -> torch.Tensor:
        """The prompts' encodings with ``vectors`` (n, d) in their last n positions."""
        check_free_tail(pipe.tokenizer, prompts, self.num_vectors)
        embeds, _ = pipe.encode_prompt(prompts, pipe._execution_device, 1, False)
        return replace_last(embeds, vectors)


def generate(
    pipe,
    subject: HiFiSubject,
    prompt: str | list[str],
    *,
    num_inference_steps: int | None = None,
    num_images_per_prompt: int = 1,
    stepwise: bool = True,
    **kwargs,
):
    """``pipe(...)`` with the subject in every prompt (x_{t-1} = F^(t)(x_t, [c, c_s^t], phi), Eq. 7): the prompts
    name the subject by its word; the vectors of step i go into the encoding's last n positions at step i, through
    the stock pipeline's step-end callback (a ``callback_on_step_end`` passed here runs first, and may also ask for
    other tensors). Other keyword arguments go to the pipeline."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("HiFi Tuner subjects support pipelines with one text encoder (SD 1.x/2.x), not SDXL yet")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    steps, rows = subject.schedule(pipe.scheduler, num_inference_steps, stepwise)
    positive = subject.prompt_embeds(pipe, prompts, rows[0]).repeat_interleave(num_images_per_prompt, dim=0)
    count = positive.shape[0]
    callback = kwargs.pop("callback_on_step_end", None)
    inputs = list(dict.fromkeys(["prompt_embeds", *kwargs.pop("callback_on_step_end_tensor_inputs", [])]))

    def next_step(pipe, i: int, t, tensors: dict) -> dict:
        if callback is not None:
            tensors = tensors | (callback(pipe, i, t, tensors) or {})
        embeds = tensors["prompt_embeds"]
        if i + 1 < len(rows):
            embeds = embeds.clone()
            # under CFG the pipeline's tensor is [unconditional; conditional]: the conditional rows are the last
            embeds[-count:] = replace_last(embeds[-count:], rows[i + 1])
        return tensors | {"prompt_embeds": embeds}

    negative = kwargs.pop("negative_prompt", None) or ""
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    negative_embeds = pipe.encode_prompt(negatives, pipe._execution_device, 1, False)[0]
    return pipe(
        prompt_embeds=positive,
        negative_prompt_embeds=negative_embeds.repeat_interleave(num_images_per_prompt, dim=0),
        num_inference_steps=steps,
        callback_on_step_end=next_step,
        callback_on_step_end_tensor_inputs=inputs,
        **kwargs,
    )
