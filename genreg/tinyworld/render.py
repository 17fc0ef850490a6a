"""Deterministic renderer: a Scene -> an anti-aliased RGB image and one mask per object."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import COLORS, Scene

IMAGE_SIZE = 64
BACKGROUND_RGB = {"white": (240, 240, 240), "black": (24, 24, 24)}
OUTLINE_RGB = (128, 128, 128)
PATTERN_SHADE = 0.45  # pattern marks are the object's colour darkened by this factor
CENTERS = {"left": (15, 32), "right": (49, 32), "top": (32, 15), "bottom": (32, 49), "center": (32, 32)}
RADII = {"small": 7.0, "large": 12.0}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Placement:
    """Where and how one object is drawn, in 64-pixel units: centre, radius and fill colour. A still scene's objects
    sit at ``CENTERS``/``RADII`` in their named colour (``placement``); video frames move between them."""

    cx: float
    cy: float
    radius: float
    rgb: tuple[float, float, float]


def placement(obj) -> Placement:
    """The placement a still scene gives ``obj``: its named position, size and colour."""
    return Placement(*CENTERS[obj.position], RADII[obj.size], COLORS[obj.color])


def _polygon(cx: float, cy: float, radius: float, n: int, start_deg: float) -> list[tuple[float, float]]:
    return [
        (
            cx + radius * math.cos(math.radians(start_deg + 360 * k / n)),
            cy + radius * math.sin(math.radians(start_deg + 360 * k / n)),
        )
        for k in range(n)
    ]


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean mask of ``shape`` centred at (cx, cy) with radius r, all in supersampled pixels."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, 1.15 * r, 3, -90), fill=255)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, 1.1 * r, 4, -90), fill=255)
    elif shape == "cross":
        t = 0.36 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
    elif shape == "star":
        outer, inner = _polygon(cx, cy, 1.15 * r, 5, -90), _polygon(cx, cy, 0.5 * r, 5, -54)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=255)
    elif shape == "moon":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        d, rc = 0.75 * r, 0.85 * r  # a fat crescent: the cut circle is smaller and further right
        draw.ellipse((cx + d - rc, cy - rc, cx + d + rc, cy + rc), fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img) > 127


def _pattern_mask(pattern: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Where the pattern's darker marks fall; (dx, dy) are offsets from the object's centre in output pixels."""
    if pattern == "solid":
        return np.zeros(dx.shape, bool)
    # Marks are 4 px or more across: the VAE's 16x16 latent (one latent pixel per 4x4 block) can carry them.
    if pattern == "striped":
        return np.floor(dy / 4.0 + 0.5) % 2 == 1
    if pattern == "dotted":
        gx, gy = dx - 6.0 * np.round(dx / 6.0), dy - 6.0 * np.round(dy / 6.0)
        return gx**2 + gy**2 <= 2.0**2
    if pattern == "checkered":
        return (np.floor(dx / 4.0 + 0.5) + np.floor(dy / 4.0 + 0.5)) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


def render(
    scene: Scene, image_size: int = IMAGE_SIZE, placements: Sequence[Placement] | None = None
) -> tuple[Image.Image, np.ndarray]:
    """Renders ``scene``; returns the RGB image and masks of shape (n_objects, H, W), bool. ``placements`` (one per
    object) moves, resizes or recolours the objects, as a video frame does; shape, pattern and outline stay."""
    if placements is None:
        placements = [placement(o) for o in scene.objects]
    elif len(placements) != len(scene.objects):
        raise ValueError(f"got {len(placements)} placements for a scene of {len(scene.objects)} objects")
    s = _SUPERSAMPLE
    big = image_size * s
    scale = image_size / IMAGE_SIZE * s
    canvas = np.empty((big, big, 3), np.float32)
    canvas[:] = BACKGROUND_RGB[scene.background]
    masks = []
    for obj, place in zip(scene.objects, placements, strict=True):
        cx, cy = (c * scale + s / 2 for c in (place.cx, place.cy))
        body = _shape_mask(obj.shape, cx, cy, place.radius * scale, big)
        # Work inside the object's bounding box (grown by the outline) only: patterns and outlines are local.
        pad = int(round(1.5 * scale))
        ys, xs = np.nonzero(body)
        top, bottom = max(ys.min() - pad, 0), min(ys.max() + pad + 1, big)
        left, right = max(xs.min() - pad, 0), min(xs.max() + pad + 1, big)
        box = np.s_[top:bottom, left:right]
        inside, patch = body[box], canvas[box]
        mask = body.copy()
        if obj.outline == "outlined":
            # A ring just outside the body, so the object keeps its colour however small it is.
            ring = np.asarray(
                Image.fromarray(inside.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * pad + 1))
            )
            ring = (ring > 127) & ~inside
            patch[ring] = OUTLINE_RGB
            mask[box] |= ring
        masks.append(mask)
        color = np.array(place.rgb, np.float32)
        patch[inside] = color
        y, x = np.mgrid[box].astype(np.float32)
        marks = inside & _pattern_mask(obj.pattern, (x - cx) / scale, (y - cy) / scale)
        patch[marks] = color * PATTERN_SHADE
    small = canvas.reshape(image_size, s, image_size, s, 3).mean(axis=(1, 3))
    image = Image.fromarray(np.clip(small + 0.5, 0, 255).astype(np.uint8), "RGB")
    mask_arr = np.stack([m.reshape(image_size, s, image_size, s).mean(axis=(1, 3)) > 0.5 for m in masks])
    return image, mask_arr


def _render_array(scene: Scene) -> np.ndarray:
    return np.asarray(render(scene)[0])


def render_many(scenes: list[Scene], processes: int = 1) -> np.ndarray:
    """Renders many scenes to a uint8 array (N, 64, 64, 3), optionally in worker processes."""
    if processes <= 1:
        return np.stack([_render_array(s) for s in scenes])
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(processes) as pool:
        return np.stack(pool.map(_render_array, scenes, chunksize=256))
