"""The Tiny World evaluator: reads every attribute of every object back from an image, and embeds images.

A small CNN trained on rendered labels. Objects sit at one of five positions, so the network predicts one *slot*
per position: is an object there, and its shape, colour, size, pattern and outline; plus the background. Scoring a
generated image against its prompt compares those readings with what the prompt names (``parse_prompt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from .render import IMAGE_SIZE
from .world import BACKGROUNDS, OBJECT_ATTRIBUTES, POSITIONS, Scene, parse_prompt

SLOT_ATTRIBUTES = ("shape", "color", "size", "pattern", "outline")  # position is the slot itself
_HEAD_SIZES = [1] + [len(OBJECT_ATTRIBUTES[a]) for a in SLOT_ATTRIBUTES]
EMBED_DIM = 256


class EvaluatorNet(nn.Module):
    def __init__(self):
        super().__init__()
        chans, layers, c_in = (24, 48, 96), [], 3
        for c in chans:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            layers += [nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * (IMAGE_SIZE // 8) ** 2, EMBED_DIM), nn.SiLU())
        self.slots = nn.Linear(EMBED_DIM, len(POSITIONS) * sum(_HEAD_SIZES))
        self.background = nn.Linear(EMBED_DIM, len(BACKGROUNDS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """x in [0, 1], (B, 3, 64, 64) -> (embedding, per-head logits (B, slots, classes), background logits)."""
        e = self.embed(self.features(x * 2 - 1))
        slots = self.slots(e).view(len(x), len(POSITIONS), sum(_HEAD_SIZES))
        return e, list(slots.split(_HEAD_SIZES, dim=-1)), self.background(e)


def scene_targets(scene: Scene) -> tuple[np.ndarray, int]:
    """Label array (slots, 1 + len(SLOT_ATTRIBUTES)) with -1 where no object sits, and the background index."""
    target = np.full((len(POSITIONS), 1 + len(SLOT_ATTRIBUTES)), -1, np.int64)
    target[:, 0] = 0
    for obj in scene.objects:
        row = target[POSITIONS.index(obj.position)]
        row[0] = 1
        for k, name in enumerate(SLOT_ATTRIBUTES):
            row[1 + k] = OBJECT_ATTRIBUTES[name].index(getattr(obj, name))
    return target, BACKGROUNDS.index(scene.background)


def evaluator_loss(net: EvaluatorNet, images: torch.Tensor, targets: torch.Tensor, backgrounds: torch.Tensor):
    """Cross-entropy over presence, the attributes of present objects, and the background."""
    _, heads, bg = net(images)
    loss = F.binary_cross_entropy_with_logits(heads[0].squeeze(-1), targets[..., 0].float())
    for k, logits in enumerate(heads[1:]):
        loss = loss + F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[..., 1 + k].reshape(-1), ignore_index=-1
        )
    return loss + F.cross_entropy(bg, backgrounds)


def to_tensor(images) -> torch.Tensor:
    """PIL images, a uint8 array (B, H, W, 3), or a float tensor (B, 3, H, W) in [0, 1] -> float (B, 3, 64, 64)."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        if isinstance(images, Image.Image):
            images = [images]
        arr = np.stack([np.asarray(im.convert("RGB")) for im in images]) if isinstance(images, list) else images
        x = torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape (B, 3, H, W), got {tuple(x.shape)}")
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


@dataclass
class Reading:
    """What the evaluator sees in one image: objects by position (attribute -> value), the background, and its
    confidence: the mean probability of the values it read (low for images that are not tiny-world scenes)."""

    objects: dict[str, dict[str, str]]
    background: str
    confidence: float = 1.0


EMPTY_PIXELS = 16  # a small object covers ~150 pixels; fewer changed ones than this is an empty scene


def is_empty(x: torch.Tensor) -> torch.Tensor:
    """(B,) bool: nothing but the background is drawn, i.e. fewer than ``EMPTY_PIXELS`` pixels differ from the
    border's median colour. The network was trained on scenes that always hold an object, so this is what tells it an
    empty one; scenes with objects are read as the network reads them."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    changed = (x - border.median(dim=-1).values[..., None, None]).abs().amax(dim=1) > 0.15  # (B, H, W)
    return changed.flatten(1).sum(dim=1) < EMPTY_PIXELS


class Evaluator:
    """Loads the bundled evaluator weights; reads, embeds and scores images."""

    def __init__(self, net: EvaluatorNet, device: str | torch.device = "cpu"):
        self.net = net.eval().to(device)
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> Evaluator:
        path = Path(path) if path is not None else Path(__file__).with_name("evaluator.safetensors")
        if not path.is_file():
            raise FileNotFoundError(
                f"evaluator weights not found at {path}; run scripts/train_tinyworld.py to make them"
            )
        net = EvaluatorNet()
        net.load_state_dict(load_file(str(path)))
        return cls(net, device)

    @torch.no_grad()
    def _run(self, images, batch_size: int = 256):
        x = to_tensor(images)
        outs = [self.net(x[i : i + batch_size].to(self.device)) for i in range(0, len(x), batch_size)]
        emb = torch.cat([o[0] for o in outs]).cpu()
        heads = [torch.cat([o[1][k] for o in outs]).cpu() for k in range(len(_HEAD_SIZES))]
        return emb, heads, torch.cat([o[2] for o in outs]).cpu()

    def embed(self, images) -> torch.Tensor:
        """L2-normalised image embeddings (B, 256): cosine similarity measures how alike two images look."""
        return F.normalize(self._run(images)[0], dim=-1)

    def read(self, images) -> list[Reading]:
        x = to_tensor(images)
        _, heads, bg = self._run(x)
        present = (heads[0].squeeze(-1) > 0) & ~is_empty(x)[:, None]
        probs = [logits.softmax(-1) for logits in heads[1:]]
        bg_probs = bg.softmax(-1)
        readings = []
        for b in range(len(bg)):
            slots = [s for s in range(len(POSITIONS)) if present[b, s]]
            objects = {
                POSITIONS[s]: {
                    name: OBJECT_ATTRIBUTES[name][int(p[b, s].argmax())]
                    for name, p in zip(SLOT_ATTRIBUTES, probs, strict=True)
                }
                for s in slots
            }
            sure = [float(bg_probs[b].max())] + [float(probs[k][b, s].max()) for s in slots for k in range(len(probs))]
            readings.append(Reading(objects, BACKGROUNDS[int(bg[b].argmax())], sum(sure) / len(sure)))
        return readings

    def accuracy(self, images, scenes: list[Scene]) -> dict[str, float]:
        """Per-attribute accuracy against known scenes, over every object (named and unnamed attributes)."""
        hits: dict[str, list[bool]] = {}
        for reading, scene in zip(self.read(images), scenes, strict=True):
            hits.setdefault("count", []).append(len(reading.objects) == len(scene.objects))
            hits.setdefault("background", []).append(reading.background == scene.background)
            for obj in scene.objects:
                got = reading.objects.get(obj.position)
                hits.setdefault("position", []).append(got is not None)
                for name in SLOT_ATTRIBUTES:
                    hits.setdefault(name, []).append(got is not None and got[name] == getattr(obj, name))
        return {name: float(np.mean(v)) for name, v in hits.items()}

    def score(self, images, prompts: list[str]) -> dict[str, float]:
        """Accuracy of generated ``images`` against the ``prompts`` that produced them.

        Per attribute: the fraction of (object, attribute) pairs the prompts name that the image shows (pattern and
        outline only where named); ``count``: the image holds as many objects as the prompt names; ``all_correct``:
        every named attribute and the count.
        """
        readings = self.read(images)
        if len(readings) != len(prompts):
            raise ValueError(f"got {len(readings)} images for {len(prompts)} prompts")
        hits: dict[str, list[bool]] = {name: [] for name in (*OBJECT_ATTRIBUTES, "background", "count", "all_correct")}
        for reading, prompt in zip(readings, prompts, strict=True):
            ok = match_prompt(reading, prompt)
            for name, values in ok.items():
                hits[name].extend(values)
            hits["all_correct"].append(all(all(v) for v in ok.values()))
        return {name: float(np.mean(v)) for name, v in hits.items() if v} | {"n": len(prompts)}


def match_prompt(reading: Reading, prompt: str) -> dict[str, list[bool]]:
    """Per named attribute, whether each object the prompt names shows it in ``reading``."""
    spec = parse_prompt(prompt)
    ok: dict[str, list[bool]] = {"count": [len(reading.objects) == len(spec.objects)]}
    if spec.background is not None:
        ok["background"] = [reading.background == spec.background]
    free = dict(reading.objects)
    # Objects whose position is named are read at that slot; the others take the best-matching remaining object.
    for want in sorted(spec.objects, key=lambda w: "position" not in w):
        if "position" in want:
            got = free.pop(want["position"], None)
        else:
            best = max(free, key=lambda p: sum(free[p].get(a) == v for a, v in want.items()), default=None)
            got = free.pop(best) if best is not None else None
        for name, value in want.items():
            ok.setdefault(name, []).append(got is not None and (name == "position" or got.get(name) == value))
    return ok
