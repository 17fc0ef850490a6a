"""Small file helpers shared by the library, the CLI, scripts and the app: atomic writes and image I/O."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Calls ``write(tmp)`` to write a file or directory beside ``path``, then renames it into place: ``path`` is
    either its old self or complete, never half-written. A failed write leaves no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process that was killed while writing
    tmp.unlink(missing_ok=True)
    try:
        write(tmp)
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB; 16-bit and 32-bit grey levels are scaled down, not clipped to white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        levels = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and np.nanmax(levels, initial=0.0) <= 1.0:
            levels = levels * 255
        elif image.mode != "F" and (image.mode.startswith("I;16") or levels.max(initial=0) > 255):
            levels = levels / 257  # 0..65535 -> 0..255
        image = Image.fromarray(np.nan_to_num(levels).clip(0, 255).round().astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image file as RGB (16-bit files scaled to 8 bits), or raises an error that says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
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


def check_output_path(path: str | os.PathLike, overwrite_of: str | os.PathLike | None = None) -> Path:
    """Refuses, before any work, an output image path that cannot be written: a folder, an unknown extension, a
    folder that cannot be created or written, or (``overwrite_of``) the input file itself."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; name an image file in it, e.g. {path / 'out.png'}")
    extension = path.suffix.lower()
    if extension not in Image.registered_extensions():
        raise ValueError(f"output {path} has no image extension PIL writes ({extension or 'none'}); use .png or .jpg")
    if overwrite_of is not None and path.resolve() == Path(overwrite_of).resolve():
        raise ValueError(f"output {path} is the input image: the edit would overwrite it; choose another --out")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"output {path} cannot be written here (permission denied); choose another --out")
    return path


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    """Saves atomically (a half-written file never appears under ``path``)."""
    image_format = (Path(path).suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG")
    return atomic_write(path, lambda tmp: image.save(tmp, format=image_format))
