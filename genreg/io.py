"""Small image I/O helpers shared by the CLI, scripts and the app."""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image file as RGB, or raises an error that says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image file; pass a PNG, JPEG or WebP image") from err


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Pastes equally sized images into a grid, row by row."""
    if not images:
        raise ValueError("no images to put in a grid")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    """Saves atomically (a half-written file never appears under ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    os.replace(tmp, path)
    return path
