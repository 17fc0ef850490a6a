"""New-concept kits: the shared yardstick of fine-tuning, unlearning and memorization work.

A concept is a held-out value (``HELD_OUT``: the checkered pattern, the moon shape, the cyan colour) that the bundled
model never saw and no training caption named. A kit holds renders of single objects that carry it, with captions
that name it and every other attribute (``scene_prompt(details=True)``), as a fine-tuning set names what it shows.
Evaluation prompts (:func:`concept_prompts`) name the value in combinations the kit does not hold (another seed), so
learning it means generalising the word, not copying the kit.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .render import render
from .world import HELD_OUT, POSITIONS, Scene, sample_object, scene_prompt

CONCEPTS: dict[str, str] = {value: attribute for attribute, values in HELD_OUT.items() for value in values}


def _attribute(concept: str) -> str:
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; the held-out values are {', '.join(CONCEPTS)}")
    return CONCEPTS[concept]


def concept_scenes(concept: str, n: int, seed: int) -> list[Scene]:
    """``n`` single-object scenes whose object has ``concept``; its other attributes from the base values."""
    attribute, rng = _attribute(concept), random.Random(f"concept-{concept}-{seed}")
    return [
        Scene(
            (sample_object(rng, rng.choice(POSITIONS), holdout=True, **{attribute: concept}),),
            rng.choice(("white", "black")),
        )
        for _ in range(n)
    ]


def concept_caption(scene: Scene) -> str:
    """Every attribute named, the concept's among them: "a large plain checkered red circle on the left on a ..."."""
    return scene_prompt(scene, background=True, details=True)


def concept_prompts(concept: str, n: int, seed: int = 1) -> list[tuple[str, Scene]]:
    """``n`` evaluation (prompt, scene) pairs naming ``concept``, drawn apart from the kit (``seed`` != the kit's)."""
    return [(concept_caption(scene), scene) for scene in concept_scenes(concept, n, seed + 10_000)]


def write_concept_kit(concept: str, directory: str | Path, n: int = 24, seed: int = 0) -> Path:
    """Renders ``n`` images of ``concept`` with their captions (``metadata.jsonl``) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(concept_scenes(concept, n, seed)):
        name = f"{concept}-{i:03d}.png"
        render(scene)[0].save(directory / name)
        rows.append(json.dumps({"file_name": name, "text": concept_caption(scene)}))
    (directory / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return directory
