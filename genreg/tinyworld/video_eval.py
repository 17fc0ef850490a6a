"""Per-frame scoring of Tiny World clips: what each frame shows, whether the clip does what its prompt says.

The image evaluator reads objects at the five still slots, and a moving object sits between them. So each frame is
split into its objects first (pixels that differ from the background, grouped into connected parts), each object is
moved to the centre of a blank frame of the same background, and the evaluator reads it there. Its centroid and area
give position and size exactly; its reading gives shape, colour and details; its embedding, how alike it stays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import frechet_distance
from .evaluator import EMPTY_PIXELS, Evaluator
from .render import CENTERS, IMAGE_SIZE
from .video import TRACK, TRANSLATIONS, parse_motion
from .world import parse_prompt

FOREGROUND = 0.15  # a pixel whose colour is this far (any channel, in [0, 1]) from the background's is drawn
NEAR_PX = 8.0  # an object "stays" when its centroid moves less than this; a still slot is "hit" within it
JUMP_PX = 6.0  # a frame-to-frame step larger than this (a translation's own step is 34/15 = 2.3 px) is a jump
TRACK_SHARE = 0.5  # a translation is followed when it covers at least half of the true track (17 px)
IDENTITY_SHARE = 0.9  # an attribute is kept when this share of frames reads the same value
GROWTH = 1.5  # growing is followed when the last frame's area is at least 1.5x the first's (truth: ~2.9x)


@dataclass
class FrameObject:
    """One object in one frame: centroid (x, y) and area in pixels, the evaluator's reading, and its embedding."""

    x: float
    y: float
    area: int
    reading: dict[str, str]
    embedding: torch.Tensor = field(repr=False)


def frames_tensor(frames) -> torch.Tensor:
    """A clip as float (F, 3, 64, 64) in [0, 1], from uint8 (F, H, W, 3), float (F, H, W, 3) in [0, 1], or a tensor
    already laid out so."""
    x = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
    if x.ndim != 4:
        raise ValueError(f"a clip is a stack of frames (F, H, W, 3), got shape {tuple(x.shape)}")
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255 if x.dtype == torch.uint8 or x.max() > 1.5 else x.float()
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def background_colour(x: torch.Tensor) -> torch.Tensor:
    """(F, 3): the median colour of each frame's border."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    return border.median(dim=-1).values


def components(mask: torch.Tensor) -> torch.Tensor:
    """Connected parts (8-neighbour) of a bool mask (F, H, W): labels (F, H, W), 0 for background."""
    h, w = mask.shape[-2:]
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand_as(mask) * mask
    while True:  # each part takes its largest index; a few dozen rounds for a 64x64 frame
        grown = F.max_pool2d(labels[:, None], 3, 1, 1)[:, 0] * mask
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


class VideoEvaluator:
    """Reads clips frame by frame with the image evaluator, and scores them against their prompts."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator

    @classmethod
    def load(cls, path=None, device: str | torch.device = "cpu") -> VideoEvaluator:
        return cls(Evaluator.load(path, device))

    def objects(self, frames) -> list[list[FrameObject]]:
        """Per frame, its objects (parts of at least ``EMPTY_PIXELS`` pixels), largest first, at most two."""
        x = frames_tensor(frames)
        bg = background_colour(x)
        mask = (x - bg[..., None, None]).abs().amax(dim=1) > FOREGROUND
        labels = components(mask)
        crops, found = [], []
        ys, xs = torch.meshgrid(torch.arange(IMAGE_SIZE), torch.arange(IMAGE_SIZE), indexing="ij")
        for f in range(len(x)):
            ids, counts = labels[f].unique(return_counts=True)
            parts = sorted(((int(c), int(i)) for i, c in zip(ids, counts, strict=True) if i > 0 and c >= EMPTY_PIXELS))
            frame = []
            for area, i in reversed(parts[-2:]):
                part = labels[f] == i
                cx, cy = float(xs[part].float().mean()), float(ys[part].float().mean())
                # The part (grown by a pixel, for its anti-aliased rim) on a blank frame, its centroid at the centre.
                keep = F.max_pool2d(part[None, None].float(), 3, 1, 1)[0, 0] > 0
                canvas = torch.where(keep, x[f], bg[f][:, None, None])
                shift = (round(CENTERS["center"][1] - cy), round(CENTERS["center"][0] - cx))
                crops.append(_shifted(canvas, shift, bg[f]))
                frame.append((cx, cy, area))
            found.append(frame)
        if not crops:
            return [[] for _ in found]
        stack = torch.stack(crops)
        readings = self.evaluator.read(stack)
        embeddings = self.evaluator.embed(stack)
        out, k = [], 0
        for frame in found:
            objs = []
            for cx, cy, area in frame:
                reading = readings[k].objects.get("center") or next(iter(readings[k].objects.values()), {})
                objs.append(FrameObject(cx, cy, area, reading, embeddings[k]))
                k += 1
            out.append(objs)
        return out

    def score_clip(self, frames, prompt: str) -> dict[str, float]:
        """The clip's scores against ``prompt`` (a clip prompt, e.g. "a red circle moving to the right"):

        - ``adherence``: the share of frames that show every object the prompt names with every attribute it names
          and the motion leaves alone (size under ``growing`` and colour under ``turning`` are the motion's);
        - ``identity``: 1 when every frame holds the same number of objects and each reads the same shape, colour,
          pattern and outline (shape alone under ``turning``) in ``IDENTITY_SHARE`` of the frames; ``similarity``:
          the objects' mean embedding cosine similarity to the first frame;
        - ``motion_followed``: a translation covers at least half the track the right way, most steps going that way,
          while the other axis stays; growing multiplies the area by ``GROWTH`` or more in place; turning reads the
          named colours at the first and last frame;
        - ``jumps``: frame-to-frame centroid steps over ``JUMP_PX``; ``step_px``: the mean step.
        """
        motion, to_color, rest = parse_motion(prompt)
        wanted = parse_prompt(rest).objects
        frames_objs = self.objects(frames)
        tracks = _tracks(frames_objs, wanted, motion)
        static = ("shape", "pattern", "outline") + (() if motion == "turning" else ("color",))
        named = [k for k in (*static, "size") if not (k == "size" and motion == "growing")]

        def frame_ok(f: int) -> bool:
            if len(frames_objs[f]) != len(wanted):
                return False
            for want, track in zip(wanted, tracks, strict=True):
                obj = track[f]
                if any(obj.reading.get(k) != want[k] for k in named if k in want):
                    return False
                if motion not in TRANSLATIONS and "position" in want:
                    cx, cy = CENTERS[want["position"]]
                    if np.hypot(obj.x - cx, obj.y - cy) > NEAR_PX:
                        return False
            return True

        n = len(frames_objs)
        counts_kept = len({len(objs) for objs in frames_objs}) == 1 and len(frames_objs[0]) > 0
        # Between named colours the evaluator's detail heads are out of their training range, so a turning clip's
        # identity is its shape; one frame in ten may be misread (a true growing clip may show one as another shape).
        kept = ("shape",) if motion == "turning" else static
        identity = counts_kept and all(
            max(reads.count(v) for v in reads) >= IDENTITY_SHARE * n
            for track in tracks
            for k in kept
            for reads in [[track[f].reading.get(k) for f in range(n)]]
        )
        similarity = (
            float(np.mean([float(track[f].embedding @ track[0].embedding) for track in tracks for f in range(1, n)]))
            if counts_kept
            else 0.0
        )
        steps = [np.hypot(t[f].x - t[f - 1].x, t[f].y - t[f - 1].y) for t in tracks for f in range(1, n)] or [0.0]
        return {
            "adherence": float(np.mean([frame_ok(f) for f in range(n)])),
            "identity": float(identity),
            "similarity": similarity,
            "motion_followed": float(
                counts_kept
                and all(_followed(t, motion, w.get("color"), to_color) for w, t in zip(wanted, tracks, strict=True))
            ),
            "jumps": float(sum(s > JUMP_PX for s in steps)),
            "step_px": float(np.mean(steps)),
        }

    def score(self, videos, prompts: list[str]) -> dict[str, float]:
        """Mean of ``score_clip`` over clips, and ``smooth``: the share of clips without a jump."""
        if len(videos) != len(prompts):
            raise ValueError(f"got {len(videos)} clips for {len(prompts)} prompts")
        return summarize([self.score_clip(v, p) for v, p in zip(videos, prompts, strict=True)])

    def clip_embedding(self, frames) -> torch.Tensor:
        """(512,): the frames' mean evaluator embedding, and the last frame's minus the first's (what moved)."""
        e = self.evaluator.embed(frames_tensor(frames))
        return torch.cat([e.mean(0), e[-1] - e[0]])

    def frechet(self, videos, reference) -> float:
        """Fréchet distance between two sets of clips over ``clip_embedding``."""
        embed = lambda clips: torch.stack([self.clip_embedding(c) for c in clips])  # noqa: E731
        return frechet_distance(embed(videos), embed(reference))


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of per-clip ``score_clip`` results, ``smooth`` (the share of clips without a jump) and ``n``."""
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return out | {"smooth": float(np.mean([r["jumps"] == 0 for r in rows])), "n": len(rows)}


def _shifted(image: torch.Tensor, shift: tuple[int, int], fill: torch.Tensor) -> torch.Tensor:
    """``image`` (3, H, W) moved by (dy, dx) pixels, the uncovered border filled with ``fill``."""
    dy, dx = shift
    out = fill[:, None, None].expand_as(image).clone()
    h, w = image.shape[-2:]
    src = image[:, max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    out[:, max(dy, 0) : max(dy, 0) + src.shape[1], max(dx, 0) : max(dx, 0) + src.shape[2]] = src
    return out


def _tracks(frames_objs: list[list[FrameObject]], wanted: list[dict], motion: str) -> list[list[FrameObject]]:
    """Per named object, its object in every frame. Two objects are told apart across the translation's axis (the
    one named at the top or on the left takes the smaller coordinate); frames missing one repeat the nearest."""
    n_want = len(wanted)
    if n_want == 2 and motion in TRANSLATIONS:
        across = "y" if TRANSLATIONS[motion][1] == 0 else "x"
        first = 0 if wanted[0].get("position") in ("top", "left") else 1
        order = [first, 1 - first]
    else:
        across, order = None, list(range(n_want))
    tracks: list[list[FrameObject]] = [[] for _ in range(n_want)]
    last: list[FrameObject | None] = [None] * n_want
    for objs in frames_objs:
        if across is not None and len(objs) == 2:
            objs = sorted(objs, key=lambda o: getattr(o, across))
            objs = [objs[order.index(k)] for k in range(2)]
        for k in range(n_want):
            obj = objs[k] if k < len(objs) else last[k]
            last[k] = obj
            tracks[k].append(obj)
    # Leading frames with nothing take the first object seen; a clip with no object at all is a track of blanks.
    for track in tracks:
        seen = next((o for o in track if o is not None), FrameObject(-1e3, -1e3, 0, {}, torch.zeros(1)))
        track[:] = [o if o is not None else seen for o in track]
    return tracks


def _followed(track: list[FrameObject], motion: str, from_color: str | None, to_color: str | None) -> bool:
    first, last = track[0], track[-1]
    if motion == "turning":
        return first.reading.get("color") == from_color and last.reading.get("color") == to_color
    stayed_x, stayed_y = abs(last.x - first.x) <= NEAR_PX, abs(last.y - first.y) <= NEAR_PX
    if motion == "growing":
        return stayed_x and stayed_y and last.area >= GROWTH * max(first.area, 1)
    dx, dy = TRANSLATIONS[motion]
    along = [(b.x - a.x) * dx + (b.y - a.y) * dy for a, b in zip(track, track[1:], strict=False)]
    moving = [s for s in along if abs(s) > 0.5]
    covered = sum(along) >= TRACK_SHARE * (TRACK[1] - TRACK[0])
    steady = bool(moving) and np.mean([s > 0 for s in moving]) >= 0.6
    return covered and steady and (stayed_y if dx else stayed_x)
