"""Score Forgetting Distillation's settings and its prompt sets (data-free: prompts only)."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ...config import option
from ...training.data import check_caption

TINYWORLD = "tinyworld"


@dataclass
class SFDConfig:
    """What to forget and what to draw instead, the prompts of both branches, and SiD's settings (the official SD
    run's: alpha 1, CFG 4.5 for teacher and fake, every branch weight 1; noise levels as sigmas, see
    ``timestep_of_sigma``)."""

    forget: str = option("", "the concept to forget: a word of the prompts, e.g. 'star'")
    override: str = option("", "what the forget prompts draw instead, e.g. 'circle' (it replaces the word)")
    forget_prompts: str = option(
        TINYWORLD,
        "prompts naming the concept: a text file (one per line) or 'tinyworld' (rendered-world captions)",
        place="hidden",  # a server path: the app keeps the tiny-world prompts
    )
    remain_prompts: str = option(
        TINYWORLD,
        "prompts whose images must not change: a text file or 'tinyworld' (captions without the concept)",
        place="hidden",
    )
    generator_init: str = option(
        "",
        "start the generator from this one-step generator (the generator/ folder of an earlier run, e.g. SiD without "
        "the forget branch) instead of the teacher, as the official SD run starts from a distilled SiD generator",
        place="hidden",  # a server path
    )
    alpha: float = option(1.0, "SiD's alpha (1.2 in the CIFAR-10 runs)", place="advanced")
    guidance_teacher: float = option(4.5, "CFG scale of the teacher in the generator loss", place="advanced")
    guidance_fake: float = option(4.5, "CFG scale of the fake score network in the generator loss", place="advanced")
    forget_weight: float = option(1.0, "weight of the forget branch in both losses", place="advanced")
    remain_weight: float = option(1.0, "weight of the remain branch in both losses", place="advanced")
    fake_learning_rate: float = option(
        3.0,
        "the fake score network's learning rate, as a multiple of --learning_rate (3e-6 / 1e-6 in SD)",
        place="advanced",
    )
    sigma_min: float = option(0.137, "lowest noise level of the losses (t 20 in SD, 38 in DDPM)", place="advanced")
    sigma_init: float = option(2.5, "the generator's noise level (t 625 in SD, 440 in DDPM)", place="advanced")
    sigma_max: float = option(13.08, "highest noise level of the losses (t 980 in SD, 712 in DDPM)", place="advanced")

    def __post_init__(self):
        for name in ("forget", "override"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"{name} is empty: name the concept, e.g. --forget star --override circle")
        if self.forget.strip().lower() == self.override.strip().lower():
            raise ValueError(f"forget and override are the same ({self.forget!r}): the override must differ")
        if not 0 < self.sigma_min < self.sigma_init < self.sigma_max:
            raise ValueError("the noise levels must be 0 < sigma_min < sigma_init < sigma_max")
        for name in ("alpha", "guidance_teacher", "guidance_fake", "forget_weight", "remain_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if not (math.isfinite(self.fake_learning_rate) and self.fake_learning_rate > 0):
            raise ValueError(f"fake_learning_rate must be a positive multiple, got {self.fake_learning_rate!r}")


def _word(word: str) -> re.Pattern:
    return re.compile(rf"\b{re.escape(word.strip())}\b", re.IGNORECASE)


def override_prompt(prompt: str, forget: str, override: str) -> str:
    """The forget prompt with the concept replaced by the override (the official regex replacement)."""
    return _word(forget).sub(override.strip(), prompt)


def _read(path: str, what: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"{what} file {path} does not exist; pass a text file (one prompt per line) or 'tinyworld'"
        )
    prompts = [
        check_caption(line.strip(), f"{path} line {n}") for n, line in enumerate(file.read_text().splitlines(), 1)
    ]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{what} file {path} holds no prompt")
    return prompts


def tinyworld_prompts(concept: str, with_concept: bool, n: int = 2000, seed: int = 0) -> list[str]:
    """Captions of random tiny-world scenes that name ``concept`` in every object (``with_concept``) or in none."""
    from ...tinyworld.world import OBJECT_ATTRIBUTES, caption, sample_scene

    attribute = next((a for a, values in OBJECT_ATTRIBUTES.items() if concept in values), None)
    if attribute is None:
        words = sorted({v for values in OBJECT_ATTRIBUTES.values() for v in values})
        raise ValueError(f"{concept!r} is not a tiny-world value; choose one of {', '.join(words)}")
    rng, prompts = random.Random(f"sfd-{concept}-{with_concept}-{seed}"), []
    while len(prompts) < n:
        scene = sample_scene(rng)
        if with_concept:
            scene = replace(scene, objects=tuple(replace(o, **{attribute: concept}) for o in scene.objects))
        text = caption(scene, rng, detail_p=0.5)
        named = _word(concept).search(text) is not None
        if named == with_concept and (with_concept or all(getattr(o, attribute) != concept for o in scene.objects)):
            prompts.append(text)
    return prompts


def prompt_sets(config: SFDConfig) -> tuple[list[str], list[str], list[str]]:
    """(forget prompts, their override prompts, remain prompts); every forget prompt names the concept."""
    forget = config.forget.strip()
    if config.forget_prompts == TINYWORLD:
        forget_set = tinyworld_prompts(forget, True)
    else:
        forget_set = _read(config.forget_prompts, "forget_prompts")
    unnamed = [p for p in forget_set if not _word(forget).search(p)]
    if unnamed:
        raise ValueError(f"{len(unnamed)} forget prompts do not name {forget!r}, e.g. {unnamed[0]!r}")
    remain = (
        tinyworld_prompts(forget, False)
        if config.remain_prompts == TINYWORLD
        else _read(config.remain_prompts, "remain_prompts")
    )
    return forget_set, [override_prompt(p, forget, config.override) for p in forget_set], remain
