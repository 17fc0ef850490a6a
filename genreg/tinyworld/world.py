"""The Tiny World's vocabulary: objects, scenes, captions, and prompt parsing.

A scene holds one or two objects on a plain background. Each object has four attributes that captions
usually name (shape, colour, size, position) and two *detail* attributes (fill pattern, outline) that a
share of captions names ("a striped red circle", "an outlined ...", "solid" and "plain" for the
defaults) and the others leave to the model, as a person's prompt leaves a photo's details unsaid.
Some values are *held out* of the base model's training set (``HELD_OUT``): the bundled model has
never seen them and no caption names them, which gives fine-tuning, unlearning and memorization tasks
something genuinely new to learn.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "moon")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "cyan": (40, 200, 210),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("white", "black")
PATTERNS = ("solid", "striped", "dotted", "checkered")
OUTLINES = ("none", "outlined")

# Attribute name -> its values, in label-index order (the evaluator's heads follow this order).
OBJECT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
    "position": POSITIONS,
    "pattern": PATTERNS,
    "outline": OUTLINES,
}
NAMED_ATTRIBUTES = ("shape", "color", "size", "position")
# The word a caption uses for each detail value (the defaults are named too, so "named" can mean "solid").
DETAIL_WORDS: dict[str, dict[str, str]] = {
    "pattern": {p: p for p in ("solid", "striped", "dotted", "checkered")},
    "outline": {"none": "plain", "outlined": "outlined"},
}
DETAIL_ATTRIBUTES = tuple(DETAIL_WORDS)  # named by a share of captions only (``caption(detail_p=...)``)

# Values the base model never sees in training. Renderer and evaluator know them.
HELD_OUT: dict[str, tuple[str, ...]] = {"shape": ("moon",), "color": ("cyan",), "pattern": ("checkered",)}

# Two objects never share a position and never use the center, so they cannot overlap.
PAIR_POSITIONS = ("left", "right", "top", "bottom")

POSITION_PHRASES = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "center": ("in the center", "in the middle"),
}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str
    pattern: str = "solid"
    outline: str = "none"

    def __post_init__(self):
        for name, values in OBJECT_ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(values)}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = "white"

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene holds one or two objects, got {len(self.objects)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose one of {', '.join(BACKGROUNDS)}")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects cannot share the position {positions[0]!r}")
        if len(positions) == 2 and "center" in positions:
            raise ValueError("two-object scenes place objects at left/right/top/bottom, not the center")

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "background": self.background}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(tuple(Obj(**o) for o in d["objects"]), d.get("background", "white"))


def allowed_values(attribute: str, holdout: bool) -> tuple[str, ...]:
    """Values of ``attribute``, without the held-out ones when ``holdout``."""
    values = OBJECT_ATTRIBUTES[attribute]
    return tuple(v for v in values if v not in HELD_OUT.get(attribute, ())) if holdout else values


def sample_object(rng: random.Random, position: str, holdout: bool = True, **fixed: str) -> Obj:
    """A random object at ``position``; keyword arguments pin attributes."""
    attrs = {name: rng.choice(allowed_values(name, holdout)) for name in OBJECT_ATTRIBUTES if name != "position"}
    attrs.update(fixed)
    return Obj(position=position, **attrs)


def sample_scene(rng: random.Random, n_objects: int | None = None, holdout: bool = True) -> Scene:
    """A random scene. ``holdout`` excludes the ``HELD_OUT`` values (the base training distribution)."""
    n = n_objects if n_objects is not None else rng.choice((1, 2))
    positions = [rng.choice(POSITIONS)] if n == 1 else rng.sample(PAIR_POSITIONS, 2)
    objects = tuple(sample_object(rng, p, holdout) for p in positions)
    return Scene(objects, rng.choice(BACKGROUNDS))


# ---------------------------------------------------------------------------------------------------------------------
# Captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(
    obj: Obj, size: bool = True, color: bool = True, pattern: bool = False, outline: bool = False
) -> str:
    """ "a large outlined striped red circle": the chosen attributes in a fixed order."""
    words = [obj.size] if size else []
    words += [DETAIL_WORDS["outline"][obj.outline]] if outline else []
    words += [DETAIL_WORDS["pattern"][obj.pattern]] if pattern else []
    words += ([obj.color] if color else []) + [obj.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def scene_prompt(scene: Scene, background: bool = False, details: bool = False) -> str:
    """The canonical prompt naming every named attribute of every object (the evaluation phrasing); ``details``
    also names each object's pattern and outline."""
    parts = [
        f"{object_phrase(o, pattern=details, outline=details)} {POSITION_PHRASES[o.position][0]}"
        for o in scene.objects
    ]
    text = " and ".join(parts)
    return f"{text} on a {scene.background} background" if background else text


def caption(scene: Scene, rng: random.Random, background_p: float = 0.45, detail_p: float = 0.0) -> str:
    """A random caption of ``scene`` from several templates; some named attributes may be left out.

    ``background_p`` is the share of captions that name the background; ``detail_p`` the share of objects whose
    pattern is named, and, drawn apart, whose outline is (0: never, the first bundled model's captions).

    Training captions vary so that phrasings a person types ("a red circle on the left", "a small blue
    square at the top", "a large green star, black background", "a striped red circle") all work.
    """
    for name, share in (("background_p", background_p), ("detail_p", detail_p)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} is a share of captions, between 0 and 1; got {share}")
    two = len(scene.objects) == 2
    parts = []
    for o in scene.objects:
        size, color = rng.random() < 0.7, rng.random() < 0.9
        # No draw when details are never named: the same seed then gives the first model's captions exactly.
        pattern, outline = (rng.random() < detail_p, rng.random() < detail_p) if detail_p > 0 else (False, False)
        phrase = object_phrase(o, size=size, color=color, pattern=pattern, outline=outline)
        if two or rng.random() < 0.85:
            phrase += " " + rng.choice(POSITION_PHRASES[o.position])
        parts.append(phrase)
    if two and rng.random() < 0.5:
        parts.reverse()
    text = " and ".join(parts)
    style = rng.random()
    if style < 0.55 * background_p:
        text = f"{text}, {scene.background} background"
    elif style < background_p:
        text = f"{text} on a {scene.background} background"
    if rng.random() < 0.15:
        text = f"an image of {text}"
    return text


# ---------------------------------------------------------------------------------------------------------------------
# Prompt parsing: what a prompt asks for, so generated images can be scored against it.

_POSITION_PATTERN = re.compile(r"\b(?:on the|at the|in the) (left|right|top|bottom|center|middle)\b")
_BACKGROUND_PATTERN = re.compile(r"\b(white|black) background\b")


@dataclass
class PromptSpec:
    """The attributes a prompt names: one dict per object (attribute -> value), and the background or None."""

    objects: list[dict[str, str]] = field(default_factory=list)
    background: str | None = None


def parse_prompt(prompt: str) -> PromptSpec:
    """Reads the named attributes (details too) out of a tiny-world prompt; raises ValueError when it names no
    object."""
    text = prompt.lower()
    spec = PromptSpec()
    bg = _BACKGROUND_PATTERN.search(text)
    if bg:
        spec.background = bg.group(1)
        text = text[: bg.start()] + text[bg.end() :]
    for chunk in re.split(r"\band\b", text):
        words = re.findall(r"[a-z]+", chunk)
        found: dict[str, str] = {}
        for name in ("shape", "color", "size"):
            hits = [w for w in words if w in OBJECT_ATTRIBUTES[name]]
            if hits:
                found[name] = hits[0]
        for name, by_value in DETAIL_WORDS.items():
            hits = [value for w in words for value, word in by_value.items() if w == word]
            if hits:
                found[name] = hits[0]
        pos = _POSITION_PATTERN.search(chunk)
        if pos:
            found["position"] = "center" if pos.group(1) == "middle" else pos.group(1)
        if "shape" in found:
            spec.objects.append(found)
    if not spec.objects:
        raise ValueError(f"prompt {prompt!r} names no tiny-world shape ({', '.join(SHAPES)})")
    return spec


# Words added to the world after the first bundled model, in groups: the tokenizer learns each group's merges after
# the ones before, and appends them, so no earlier id changes. Tiny World 2 added "plain"; the video world its motions.
VOCABULARY_ADDITIONS: tuple[tuple[str, ...], ...] = (("plain",), ("moving", "to", "up", "down", "growing", "turning"))


def vocabulary() -> list[str]:
    """Every word the world's captions use (the tokenizer makes each a single token): the first model's words in
    sorted order, then each group of ``VOCABULARY_ADDITIONS``."""
    words = {"a", "an", "and", "of", "image", "the", "on", "at", "in", "background", "middle"}
    for values in (*OBJECT_ATTRIBUTES.values(), BACKGROUNDS):
        words.update(values)
    # Common words a person might add; single tokens keep their prompts short.
    words.update("photo picture drawing with object shape color colour big tiny".split())
    return sorted(words) + [w for group in VOCABULARY_ADDITIONS for w in group]
