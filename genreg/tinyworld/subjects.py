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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .render import render
from .world import DETAIL_WORDS, POSITION_PHRASES, Obj, Scene, object_phrase

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
