"""Tiny World clips: one or two objects moving, growing or changing colour over 16 frames, with per-frame truth.

A clip is a still scene plus a motion. Translations run the whole width or height of the frame (centre 15 -> 49 px):
one object along the middle row or column, two objects along the top and bottom rows (moving left or right) or the
left and right columns (moving up or down). ``growing`` takes a small object to large at its place;
``turning <colour>`` blends its colour to another through the frames. Captions name the motion ("a red circle moving
to the right", "a small blue square on the left turning yellow"); the words are the world's ``VOCABULARY_ADDITIONS``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

import numpy as np

from .render import RADII, Placement, placement, render
from .world import (
    BACKGROUNDS,
    COLORS,
    POSITION_PHRASES,
    POSITIONS,
    Scene,
    allowed_values,
    object_phrase,
    sample_object,
)

NUM_FRAMES = 16
TRANSLATIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}  # direction in image (x, y)
MOTIONS = (*TRANSLATIONS, "growing", "turning")
MOTION_PHRASES = {
    "right": "moving to the right",
    "left": "moving to the left",
    "down": "moving down",
    "up": "moving up",
}
TRACK = (
    15.0,
    49.0,
)  # where a translation starts and ends along its axis, in pixels (the left/right, top/bottom slots)
# Which slots two objects take for a translation: across its axis, so they never meet.
PAIR_SLOTS = {"horizontal": ("top", "bottom"), "vertical": ("left", "right")}


@dataclass(frozen=True)
class Clip:
    """A scene in motion. For translations an object's ``position`` is its lane (``center`` for one object); for
    ``growing`` its ``size`` is the first frame's; ``to_color`` is where ``turning`` ends."""

    scene: Scene
    motion: str
    to_color: str | None = None

    def __post_init__(self):
        if self.motion not in MOTIONS:
            raise ValueError(f"unknown motion {self.motion!r}; choose one of {', '.join(MOTIONS)}")
        if (self.motion == "turning") != (self.to_color is not None):
            raise ValueError("a turning clip names the colour it turns to (to_color), and only a turning clip does")
        if self.to_color is not None and self.to_color not in COLORS:
            raise ValueError(f"unknown colour {self.to_color!r}; choose one of {', '.join(COLORS)}")


def _lane(motion: str, n_objects: int) -> tuple[str, ...]:
    if n_objects == 1:
        return ("center",)
    return PAIR_SLOTS["horizontal" if TRANSLATIONS[motion][1] == 0 else "vertical"]


def frame_placements(clip: Clip, num_frames: int = NUM_FRAMES) -> list[list[Placement]]:
    """The truth of every frame: each object's centre, radius and colour, moving linearly from first to last frame."""
    frames = []
    for f in range(num_frames):
        u = f / max(num_frames - 1, 1)
        places = []
        for obj in clip.scene.objects:
            p = placement(obj)
            if clip.motion in TRANSLATIONS:
                dx, dy = TRANSLATIONS[clip.motion]
                along = TRACK[0] + u * (TRACK[1] - TRACK[0])
                along = along if dx + dy > 0 else TRACK[0] + TRACK[1] - along
                p = replace(p, cx=along) if dx else replace(p, cy=along)
            elif clip.motion == "growing":
                p = replace(p, radius=RADII["small"] + u * (RADII["large"] - RADII["small"]))
            else:
                start, end = np.array(COLORS[obj.color], float), np.array(COLORS[clip.to_color], float)
                p = replace(p, rgb=tuple((1 - u) * start + u * end))
            places.append(p)
        frames.append(places)
    return frames


def render_clip(clip: Clip, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """The clip's frames as uint8 (num_frames, 64, 64, 3)."""
    return np.stack([np.asarray(render(clip.scene, placements=p)[0]) for p in frame_placements(clip, num_frames)])


def sample_clip(rng: random.Random, motion: str | None = None, holdout: bool = True) -> Clip:
    """A random clip: translations hold one or two objects, ``growing`` and ``turning`` one."""
    motion = motion or rng.choice(MOTIONS)
    if motion in TRANSLATIONS:
        lanes = _lane(motion, rng.choice((1, 2)))
        objects = tuple(sample_object(rng, lane, holdout) for lane in lanes)
        return Clip(Scene(objects, rng.choice(BACKGROUNDS)), motion)
    position = rng.choice(POSITIONS)
    if motion == "growing":
        return Clip(Scene((sample_object(rng, position, holdout, size="small"),), rng.choice(BACKGROUNDS)), motion)
    obj = sample_object(rng, position, holdout)
    to_color = rng.choice([c for c in allowed_values("color", holdout) if c != obj.color])
    return Clip(Scene((obj,), rng.choice(BACKGROUNDS)), motion, to_color)


def motion_phrase(clip: Clip) -> str:
    if clip.motion == "turning":
        return f"turning {clip.to_color}"
    return MOTION_PHRASES.get(clip.motion, clip.motion)


def clip_prompt(clip: Clip, background: bool = False, details: bool = False) -> str:
    """The canonical prompt: every object with size (not for ``growing``) and colour, pair lanes and still positions
    named, then the motion."""
    parts = []
    for o in clip.scene.objects:
        phrase = object_phrase(o, size=clip.motion != "growing", pattern=details, outline=details)
        if clip.motion not in TRANSLATIONS or len(clip.scene.objects) == 2:
            phrase += f" {POSITION_PHRASES[o.position][0]}"
        parts.append(phrase)
    text = f"{' and '.join(parts)} {motion_phrase(clip)}"
    return f"{text} on a {clip.scene.background} background" if background else text


def clip_caption(clip: Clip, rng: random.Random, background_p: float = 0.45, detail_p: float = 0.3) -> str:
    """A random training caption: size, details, lanes and places sometimes unnamed; colour and motion always named
    (what a video prompt is about)."""
    parts = []
    for o in clip.scene.objects:
        size = clip.motion != "growing" and rng.random() < 0.7
        pattern, outline = rng.random() < detail_p, rng.random() < detail_p
        phrase = object_phrase(o, size=size, pattern=pattern, outline=outline)
        if (clip.motion in TRANSLATIONS and len(clip.scene.objects) == 2) or (
            clip.motion not in TRANSLATIONS and rng.random() < 0.85
        ):
            phrase += " " + rng.choice(POSITION_PHRASES[o.position])
        parts.append(phrase)
    text = f"{' and '.join(parts)} {motion_phrase(clip)}"
    style = rng.random()
    if style < 0.55 * background_p:
        text = f"{text}, {clip.scene.background} background"
    elif style < background_p:
        text = f"{text} on a {clip.scene.background} background"
    return text


_MOTION_PATTERN = re.compile(
    r"\b(?:moving to the (right|left)|moving (up|down)|(growing)|turning (" + "|".join(COLORS) + r"))\b"
)


def parse_motion(prompt: str) -> tuple[str, str | None, str]:
    """(motion, colour turned to or None, the prompt without the motion phrase) of a clip prompt; raises ValueError
    naming the phrases when there is none."""
    found = _MOTION_PATTERN.search(prompt.lower())
    if found is None:
        phrases = ", ".join([*MOTION_PHRASES.values(), "growing", "turning <colour>"])
        raise ValueError(f"prompt {prompt!r} names no motion; say one of: {phrases}")
    right_left, up_down, growing, color = found.groups()
    motion = right_left or up_down or growing or "turning"
    rest = (prompt[: found.start()] + prompt[found.end() :]).replace("  ", " ").strip()
    return motion, color, rest


__all__ = [
    "MOTIONS",
    "NUM_FRAMES",
    "TRANSLATIONS",
    "Clip",
    "clip_caption",
    "clip_prompt",
    "frame_placements",
    "motion_phrase",
    "parse_motion",
    "render_clip",
    "sample_clip",
]
