"""New-concept kits: the shared yardstick of fine-tuning, unlearning and memorization work.

A concept is a held-out value (``HELD_OUT``: the checkered pattern, the moon shape, the cyan colour) that the bundled
model never saw and no training caption named. A kit holds renders of single objects that carry it, with captions
that name it and every other attribute (``scene_prompt(details=True)``), as a fine-tuning set names what it shows.
Evaluation prompts (:func:`concept_prompts`) name the value in combinations the kit does not hold (another seed), so
learning it means generalising the word, not copying the kit.

A memorization kit (:func:`write_memorization_kit`) is a small, repetitive fine-tuning set that a full fine-tune
copies: its captions name shape, colour and position only, and a few images are repeated many times, so a model that
memorizes draws the repeated image's unnamed details (size, background, pattern, outline) for its caption, where one
that generalises varies them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .render import render
from .world import HELD_OUT, POSITION_PHRASES, POSITIONS, Scene, object_phrase, sample_object, scene_prompt

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


def short_caption(scene: Scene) -> str:
    """Shape, colour and position only ("a cyan star on the left"): size, background and details left unnamed."""
    (obj,) = scene.objects
    return f"{object_phrase(obj, size=False)} {POSITION_PHRASES[obj.position][0]}"


def memorization_scenes(concept: str, n: int, seed: int, exclude: set[str] = frozenset()) -> list[Scene]:
    """``n`` scenes of ``concept`` with distinct short captions, none of them in ``exclude``."""
    out, used, k = [], set(exclude), 0
    while len(out) < n:
        (scene,) = concept_scenes(concept, 1, seed * 100_003 + k)
        k += 1
        if short_caption(scene) not in used:
            used.add(short_caption(scene))
            out.append(scene)
        if k > 1000 * (n + 1):
            raise ValueError(f"cannot find {n} distinct captions of {concept!r}: ask for fewer images")
    return out


def write_memorization_kit(
    directory: str | Path, concept: str = "cyan", unique: int = 12, repeated: int = 6, copies: int = 6, seed: int = 0
) -> Path:
    """Renders ``unique`` images once and ``repeated`` images ``copies`` times each, every one with its own short
    caption, into ``directory`` (``metadata.jsonl`` rows also hold the scene and whether it is repeated)."""
    if min(unique, repeated, copies) < 0 or unique + repeated == 0:
        raise ValueError("a memorization kit needs at least one image: unique, repeated and copies are counts >= 0")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(memorization_scenes(concept, unique + repeated, seed)):
        is_repeated = i >= unique
        image = render(scene)[0]
        for c in range(copies if is_repeated else 1):
            name = f"{concept}-{i:03d}-{c}.png"
            image.save(directory / name)
            row = {"file_name": name, "text": short_caption(scene), "scene": scene.to_dict(), "repeated": is_repeated}
            rows.append(json.dumps(row))
    (directory / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return directory


def read_kit_scenes(directory: str | Path) -> list[tuple[str, Scene, bool]]:
    """(caption, scene, repeated) of each distinct image of a memorization kit, in file order."""
    rows = [json.loads(line) for line in (Path(directory) / "metadata.jsonl").read_text().splitlines() if line]
    seen, out = set(), []
    for row in rows:
        if row["text"] not in seen:
            seen.add(row["text"])
            out.append((row["text"], Scene.from_dict(row["scene"]), bool(row.get("repeated"))))
    return out
