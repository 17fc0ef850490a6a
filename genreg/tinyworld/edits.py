"""Image-editing cases with known truth: a rendered source scene, the target scene one attribute away, and how to
score an edited image against them.

An ``EditCase`` changes one thing: an object's colour (``"color"``), an object's shape (``"shape"``), or the
background (``"background"``). The renderer gives the ground truth: the source image an editor receives, the target
image, and the region the edit may change (``edit_region``); outside it the two renders are pixel-identical. The
evaluator's reading of an edited image then says whether the edit happened (``edit_success``) and whether everything
else, named and unnamed, stayed as it was (``preservation``); ``masked_psnr`` measures the pixels outside the region.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter

from .evaluator import SLOT_ATTRIBUTES, Reading
from .render import render
from .world import BACKGROUNDS, Scene, allowed_values, sample_scene, scene_prompt

EDIT_KINDS = ("color", "shape", "background")


@dataclass(frozen=True)
class EditCase:
    """One edit: ``source`` becomes ``target`` by changing ``kind`` ("color" or "shape" of the object at ``index``,
    or the "background", where ``index`` is None). With ``details`` its prompts also name every object's pattern and
    outline (what a source prompt can say of a rendered scene); without, they leave them to the model."""

    kind: str
    source: Scene
    target: Scene
    index: int | None = None
    details: bool = False

    def __post_init__(self):
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"unknown edit kind {self.kind!r}; choose one of {', '.join(EDIT_KINDS)}")
        if (self.index is None) != (self.kind == "background"):
            raise ValueError("an object edit names the edited object's index; a background edit names none")

    @property
    def source_prompt(self) -> str:
        return scene_prompt(self.source, background=True, details=self.details)

    @property
    def target_prompt(self) -> str:
        return scene_prompt(self.target, background=True, details=self.details)

    @property
    def value(self) -> str:
        """The target value of the edited attribute."""
        if self.kind == "background":
            return self.target.background
        return getattr(self.target.objects[self.index], self.kind)

    @property
    def label(self) -> str:
        """A short name such as "color/2" (kind / number of objects) for grouping results."""
        return f"{self.kind}/{len(self.source.objects)}"


def make_edit(scene: Scene, kind: str, rng: random.Random, index: int | None = None, holdout: bool = True) -> EditCase:
    """An edit of ``scene``: the ``kind`` attribute of object ``index`` (random if None), or the background, set to
    another value drawn from ``rng`` (without the held-out values when ``holdout``)."""
    if kind == "background":
        other = [b for b in BACKGROUNDS if b != scene.background]
        return EditCase(kind, scene, replace(scene, background=rng.choice(other)))
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; choose one of {', '.join(EDIT_KINDS)}")
    index = rng.randrange(len(scene.objects)) if index is None else index
    obj = scene.objects[index]
    value = rng.choice([v for v in allowed_values(kind, holdout) if v != getattr(obj, kind)])
    objects = list(scene.objects)
    objects[index] = replace(obj, **{kind: value})
    return EditCase(kind, scene, replace(scene, objects=tuple(objects)), index)


def sample_edits(n: int, seed: int, holdout: bool = True, details: bool = False) -> list[EditCase]:
    """``n`` edits of random scenes, balanced over the three kinds and one- and two-object scenes: case k is of kind
    ``EDIT_KINDS[k % 3]`` in a scene of ``1 + k % 2`` objects, so any six consecutive cases cover all six groups.
    ``details``: the prompts name pattern and outline (the same scenes and edits either way)."""
    rng = random.Random(seed)
    cases = []
    for k in range(n):
        scene = sample_scene(rng, 1 + k % 2, holdout=holdout)
        case = make_edit(scene, EDIT_KINDS[k % len(EDIT_KINDS)], rng, holdout=holdout)
        cases.append(replace(case, details=details))
    return cases


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * pixels + 1))
    return np.asarray(img) > 127


def edit_region(case: EditCase, grow: int = 1) -> np.ndarray:
    """Where the edit may change pixels, (H, W) bool: the edited object's masks before and after the edit or, for a
    background edit, everything outside the objects; with every pixel on which the two renders differ (where objects
    touch, an anti-aliased pixel may hold both and a little background); grown by ``grow`` pixels."""
    (source, source_masks), (target, target_masks) = render(case.source), render(case.target)
    if case.kind == "background":
        region = ~(source_masks.any(axis=0) | target_masks.any(axis=0))
    else:
        region = source_masks[case.index] | target_masks[case.index]
    region |= (np.asarray(source) != np.asarray(target)).any(axis=-1)
    return grow_mask(region, grow)


def scene_reading(scene: Scene) -> Reading:
    """What a perfect evaluator reads from a render of ``scene``."""
    objects = {o.position: {name: getattr(o, name) for name in SLOT_ATTRIBUTES} for o in scene.objects}
    return Reading(objects, scene.background)


def edit_success(reading: Reading, case: EditCase) -> bool:
    """Whether ``reading`` shows the edited attribute at its target value (on the edited object's position)."""
    if case.kind == "background":
        return reading.background == case.value
    got = reading.objects.get(case.target.objects[case.index].position)
    return got is not None and got[case.kind] == case.value


def preservation(reading: Reading, case: EditCase) -> dict[str, bool]:
    """Every attribute the edit must leave alone, checked against the target scene: the object count, the background
    (unless edited), each object's presence at its position and its other attributes, named and unnamed.

    Keys: "count", "background", "edited object <attribute>", "other object <attribute>" (object edits; "other"
    covers every object of a background edit); an attribute of two other objects counts as kept only if kept in
    both."""
    checks = {"count": len(reading.objects) == len(case.target.objects)}
    if case.kind != "background":
        checks["background"] = reading.background == case.target.background
    for i, obj in enumerate(case.target.objects):
        who = "edited object" if i == case.index else "other object"
        got = reading.objects.get(obj.position)
        kept = {"position": got is not None}
        for name in SLOT_ATTRIBUTES:
            if not (i == case.index and name == case.kind):
                kept[name] = got is not None and got[name] == getattr(obj, name)
        for name, ok in kept.items():
            key = f"{who} {name}"
            checks[key] = checks.get(key, True) and ok
    return checks


def masked_psnr(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """PSNR in dB of two uint8 (H, W, 3) images over the pixels where ``mask`` (H, W) is True; inf when they agree."""
    a, b = np.asarray(image, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape or a.shape[:2] != mask.shape:
        raise ValueError(f"shapes differ: image {a.shape}, reference {b.shape}, mask {mask.shape}")
    if not mask.any():
        raise ValueError("the mask selects no pixel")
    mse = ((a - b) ** 2)[mask].mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
