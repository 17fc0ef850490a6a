"""Subject kits: the shared yardstick of the personalization methods.

A subject is one object with fixed shape, colour, fill pattern and outline. The kit's captions and the words a user
would type (``Subject.words``) leave pattern and outline out, so those words alone do not summon the subject: a learnt
token must carry them (``Subject.description`` names them too, the upper bound of text). A kit holds K reference
renders in varied positions and sizes (captions with ``{}`` where the token goes) and evaluation cases that put the
subject in new contexts: the center (never a reference position), a black background, and beside a second object.

Metrics (:func:`score_subject`): *identity*, the evaluator reads the subject's four attributes (named and unnamed)
on the object where the prompt put it, or on the closest object when nothing is there; plus the evaluator-embedding
cosine to the references. *Prompt alignment*, every context attribute the prompt asks for is present (the subject's
position and size, the background, the second object's position, shape, colour and size).

Replacement cases (:func:`replacement_cases`) put the subject in place of an object of a rendered scene; the source
caption names that object by its size and shape only (as an image's caption names the thing to replace), the target
swaps its shape word for the subject's; :func:`replacement_checks` reads identity at the object's place and whether
everything else was kept.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .evaluator import SLOT_ATTRIBUTES
from .render import render
from .world import DETAIL_WORDS, POSITION_PHRASES, Obj, Scene, allowed_values, object_phrase, sample_scene

IDENTITY_ATTRIBUTES = ("shape", "color", "pattern", "outline")
REFERENCE_LAYOUTS = (("left", "small"), ("right", "large"), ("top", "large"), ("bottom", "small"))


@dataclass(frozen=True)
class Subject:
    name: str
    shape: str
    color: str
    pattern: str
    outline: str

    def at(self, position: str, size: str) -> Obj:
        return Obj(self.shape, self.color, size, position, self.pattern, self.outline)

    @property
    def words(self) -> str:
        """What a user would type for the subject: colour and shape."""
        return f"{self.color} {self.shape}"

    @property
    def description(self) -> str:
        """Every identity attribute in words, as captions name details ("outlined striped orange star"): the upper
        bound of what text can say about the subject."""
        return f"{DETAIL_WORDS['outline'][self.outline]} {DETAIL_WORDS['pattern'][self.pattern]} {self.words}"


SUBJECTS = {
    s.name: s
    for s in (
        Subject("striped-orange-star", "star", "orange", "striped", "outlined"),
        Subject("dotted-purple-circle", "circle", "purple", "dotted", "none"),
        Subject("striped-green-triangle", "triangle", "green", "striped", "none"),
        Subject("dotted-yellow-square", "square", "yellow", "dotted", "outlined"),
        Subject("outlined-red-diamond", "diamond", "red", "solid", "outlined"),
    )
}


@dataclass(frozen=True)
class Case:
    """One evaluation prompt (``{}`` = the subject) and the scene it asks for."""

    template: str
    scene: Scene
    size_named: bool = True

    def prompt(self, subject_text: str) -> str:
        return self.template.format(subject_text)


def reference_scenes(subject: Subject, k: int = 4) -> list[Scene]:
    """K single-object scenes on white, cycling through varied positions and sizes (never the center)."""
    if k < 1:
        raise ValueError(f"a kit needs at least one reference image, got k={k}")
    return [Scene((subject.at(*REFERENCE_LAYOUTS[i % len(REFERENCE_LAYOUTS)]),)) for i in range(k)]


def reference_caption(scene: Scene) -> str:
    obj = scene.objects[0]
    return f"a {obj.size} {{}} {POSITION_PHRASES[obj.position][0]}"


def write_kit(subject: Subject, directory: str | Path, k: int = 4) -> Path:
    """Renders the K reference images, their captions (``metadata.jsonl``) and the subject's masks (``masks/``,
    white = the object with its outline) into ``directory``."""
    directory = Path(directory)
    (directory / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(reference_scenes(subject, k)):
        name = f"{subject.name}-{i}.png"
        image, masks = render(scene)
        image.save(directory / name)
        Image.fromarray(masks[0].astype(np.uint8) * 255).save(directory / "masks" / name)
        rows.append(json.dumps({"file_name": name, "text": reference_caption(scene)}))
    (directory / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return directory


def _companion(subject: Subject, index: int) -> tuple[str, str]:
    """A second object's (shape, colour) that differs from the subject in both."""
    shapes = [s for s in ("square", "circle", "triangle", "cross") if s != subject.shape]
    colors = [c for c in ("blue", "red", "green", "yellow") if c != subject.color]
    return shapes[index % len(shapes)], colors[index % len(colors)]


def evaluation_cases(subject: Subject) -> list[Case]:
    """Eight new contexts: center (two sizes), black background (two), and four two-object scenes."""
    cases = [
        Case("a large {} in the center", Scene((subject.at("center", "large"),))),
        Case("a small {} in the center", Scene((subject.at("center", "small"),))),
        Case("a {} at the top on a black background", Scene((subject.at("top", "large"),), "black"), False),
        Case("a small {} on the right on a black background", Scene((subject.at("right", "small"),), "black")),
    ]
    pairs = (("left", "right", "large", "small"), ("top", "bottom", "small", "large"))
    for i, (mine, other, my_size, other_size) in enumerate(pairs * 2):
        if i >= 2:
            mine, other = other, mine
        shape, color = _companion(subject, i)
        second = Obj(shape, color, other_size, other)
        where = {p: phrases[0] for p, phrases in POSITION_PHRASES.items()}
        template = f"a {my_size} {{}} {where[mine]} and {object_phrase(second)} {where[other]}"
        cases.append(Case(template, Scene((subject.at(mine, my_size), second))))
    return cases


def object_mask(image, position: str, threshold: float = 60.0) -> np.ndarray:
    """The pixels of the object drawn nearest ``position`` in a tiny-world image: those far (summed RGB distance >
    ``threshold``) from the background colour, read off the border, in the 4-connected region whose centre is
    closest to the position's centre. The offline stand-in for a grounded segmenter; all False when nothing is
    drawn."""
    from collections import deque

    from .render import CENTERS, IMAGE_SIZE

    pixels = np.asarray(image.convert("RGB"), np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    foreground = np.abs(pixels - np.median(border, axis=0)).sum(-1) > threshold
    h, w = foreground.shape
    labels, regions = np.zeros((h, w), int), []
    for start in zip(*np.nonzero(foreground), strict=True):
        if labels[start]:
            continue
        labels[start] = len(regions) + 1
        queue, members = deque([start]), []
        while queue:
            y, x = queue.popleft()
            members.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and foreground[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = len(regions) + 1
                    queue.append((ny, nx))
        regions.append(np.array(members))
    if not regions:
        return foreground
    cx, cy = (c * w / IMAGE_SIZE for c in CENTERS[position])
    nearest = min(range(len(regions)), key=lambda k: np.hypot(*(regions[k].mean(0) - (cy, cx))))
    return labels == nearest + 1


def score_subject(evaluator, images, cases: list[Case], subject: Subject, references) -> dict[str, float]:
    """Identity (all four subject attributes, each attribute, embedding cosine to the references) and alignment.

    ``images[i]`` was generated for ``cases[i % len(cases)]``.
    """
    readings = evaluator.read(images)
    emb = evaluator.embed(images)
    ref = torch.nn.functional.normalize(evaluator.embed(references).mean(0), dim=-1)
    hits: dict[str, list[bool]] = {name: [] for name in (*IDENTITY_ATTRIBUTES, "identity", "alignment")}
    for i, reading in enumerate(readings):
        case = cases[i % len(cases)]
        want, *others = case.scene.objects
        got = reading.objects.get(want.position)
        if got is None and reading.objects:
            got = max(
                reading.objects.values(), key=lambda o: sum(o[a] == getattr(want, a) for a in IDENTITY_ATTRIBUTES)
            )
        for name in IDENTITY_ATTRIBUTES:
            hits[name].append(got is not None and got[name] == getattr(want, name))
        hits["identity"].append(all(hits[name][-1] for name in IDENTITY_ATTRIBUTES))
        at_place = reading.objects.get(want.position)
        aligned = at_place is not None and (not case.size_named or at_place["size"] == want.size)
        aligned = aligned and reading.background == case.scene.background
        for other in others:
            seen = reading.objects.get(other.position)
            aligned = (
                aligned and seen is not None and all(seen[a] == getattr(other, a) for a in ("shape", "color", "size"))
            )
        hits["alignment"].append(aligned)
    scores = {name: float(np.mean(v)) for name, v in hits.items()}
    scores["embedding_similarity"] = float((emb @ ref).mean())
    return scores


@dataclass(frozen=True)
class ReplaceCase:
    """Object ``index`` of ``source`` is to become the subject (at its place and size)."""

    source: Scene
    index: int

    def prompt(self, word: str | None = None) -> str:
        """The source caption, or with ``word`` the target one: the replaced object by its size and shape (or
        ``word``), every other object by size, colour and shape, and the background."""
        parts = []
        for i, obj in enumerate(self.source.objects):
            phrase = object_phrase(obj, color=i != self.index)
            if i == self.index and word is not None:
                phrase = phrase.rsplit(" ", 1)[0] + f" {word}"
            parts.append(f"{phrase} {POSITION_PHRASES[obj.position][0]}")
        return f"{' and '.join(parts)} on a {self.source.background} background"

    def target(self, subject: Subject) -> Scene:
        objects = list(self.source.objects)
        objects[self.index] = subject.at(objects[self.index].position, objects[self.index].size)
        return replace(self.source, objects=tuple(objects))


def replacement_cases(subject: Subject, n: int, seed: int = 0) -> list[ReplaceCase]:
    """``n`` scenes of one and two objects in turn; the object to replace differs from the subject in shape and
    colour."""
    rng = random.Random(f"replace-{subject.name}-{seed}")
    shapes = [s for s in allowed_values("shape", True) if s != subject.shape]
    colors = [c for c in allowed_values("color", True) if c != subject.color]
    cases = []
    for k in range(n):
        scene = sample_scene(rng, 1 + k % 2)
        index = rng.randrange(len(scene.objects))
        objects = list(scene.objects)
        objects[index] = replace(objects[index], shape=rng.choice(shapes), color=rng.choice(colors))
        cases.append(ReplaceCase(replace(scene, objects=tuple(objects)), index))
    return cases


def replacement_checks(reading, case: ReplaceCase, subject: Subject) -> dict[str, bool]:
    """``identity``: the subject's four attributes read at the replaced object's place; ``kept``: the object count,
    the background, the replaced object's size, and every attribute of every other object."""
    target = case.target(subject)
    place = target.objects[case.index]
    got = reading.objects.get(place.position)
    identity = got is not None and all(got[a] == getattr(place, a) for a in IDENTITY_ATTRIBUTES)
    kept = len(reading.objects) == len(target.objects) and reading.background == target.background
    kept = kept and got is not None and got["size"] == place.size
    for i, obj in enumerate(target.objects):
        if i != case.index:
            seen = reading.objects.get(obj.position)
            kept = kept and seen is not None and all(seen[a] == getattr(obj, a) for a in SLOT_ATTRIBUTES)
    return {"identity": identity, "kept": kept}
