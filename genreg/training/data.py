"""Training data: an image folder with optional captions and masks, the usual augmentations, prompt templates.

A folder holds images (png, jpg, jpeg, webp, bmp). Captions, optional, come from ``metadata.jsonl`` (the datasets
``imagefolder`` convention: ``{"file_name": ..., "text": ...}`` per line) or from a ``.txt`` beside each image; a
caption may contain ``{}`` where the placeholder goes. Masks, optional, are ``masks/<image stem>.png``. Without
captions, prompts come from diffusers' textual-inversion templates. Samples are drawn by :meth:`ImageFolder.example`
as a pure function of (seed, step, index), as the training loop requires.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..config import option
from ..io import to_rgb
from ..sd import native_size, size_multiple

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# The prompt templates of diffusers' textual-inversion example (objects and styles).
OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def check_caption(text: object, where: str) -> str:
    """A caption or prompt as text that ``{}`` fills with the placeholder, or an error naming ``where`` and the fix:
    checked when the data is read, so a bad one cannot end a run at a random later step."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: the caption is a {type(text).__name__}, not text; write it as a string")
    if "{}" in text:
        try:
            text.format("x")
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(
                f"{where}: caption {text!r} has braces other than one {{}} for the token ({err!r}); write literal "
                "braces as {{ and }}"
            ) from None
    return text


def sample_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` at step ``step``: independent of batch layout and process count."""
    return np.random.default_rng([seed, step, index])


def _fit(image: Image.Image, size: int, center_crop: bool, resample) -> Image.Image:
    """Resizes the shorter side to ``size`` and crops to a square (center, or the whole image squashed)."""
    if not center_crop:
        return image.resize((size, size), resample)
    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return image.resize((size, size), resample, box=box)


@dataclass
class Item:
    pixels: torch.Tensor  # (3, size, size) in [-1, 1]
    caption: str | None
    mask: torch.Tensor | None  # (1, size, size) in {0, 1}


class ImageFolder:
    """Images (any size or mode), with their captions and masks, loaded once and fitted to ``size``."""

    def __init__(
        self,
        root: str | Path,
        size: int,
        center_crop: bool = True,
        flip_p: float = 0.5,
        learnable_property: str = "object",
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"training data folder {root} does not exist")
        if learnable_property not in TEMPLATES:
            raise ValueError(f"learnable_property must be one of {', '.join(TEMPLATES)}, got {learnable_property!r}")
        if not 0 <= flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"no images in {root}: put .png/.jpg/.webp files there")
        captions = self._captions(root)
        self.items: list[Item] = []
        for path in files:
            try:
                with Image.open(path) as im:
                    image = _fit(to_rgb(im), size, center_crop, Image.Resampling.BICUBIC)
            except (UnidentifiedImageError, OSError) as err:
                raise ValueError(f"cannot read {path} as an image ({err}); remove it or replace it") from err
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
            mask = None
            mask_path = root / "masks" / f"{path.stem}.png"
            if mask_path.is_file():
                with Image.open(mask_path) as m:
                    fitted = _fit(m.convert("L"), size, center_crop, Image.Resampling.NEAREST)
                mask = torch.from_numpy((np.asarray(fitted) > 127).astype(np.float32))[None]
            caption = captions.get(path.name)
            if caption is None and path.with_suffix(".txt").is_file():
                caption = check_caption(path.with_suffix(".txt").read_text().strip(), str(path.with_suffix(".txt")))
            self.items.append(Item(pixels, caption, mask))
        self.size, self.flip_p = size, flip_p
        self.templates = TEMPLATES[learnable_property]

    @staticmethod
    def _captions(root: Path) -> dict[str, str]:
        meta = root / "metadata.jsonl"
        if not meta.is_file():
            return {}
        out = {}
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    name, text = row["file_name"], row["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{meta} line {n}: expected {{'file_name': ..., 'text': ...}} ({err})") from err
                out[str(name)] = check_caption(text, f"{meta} line {n}")
        return out

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_masks(self) -> bool:
        return all(item.mask is not None for item in self.items)

    def sample(self, tokenizer, seed: int, step: int, index: int, placeholder: str = "", masks: bool = False) -> dict:
        """Sample ``index`` of step ``step`` for the training loop: pixels, the tokenized prompt, the seed of its
        noise and timestep, all from ``sample_rng(seed, step, index)``, and with ``masks`` the image's mask."""
        if masks and not self.has_masks:
            missing = next(i for i, item in enumerate(self.items) if item.mask is None)
            raise ValueError(f"image {missing} of the folder has no mask: add masks/<image stem>.png for every image")
        rng = sample_rng(seed, step, index)
        example = self.example(rng, placeholder)
        input_ids = tokenizer(
            example["prompt"], padding="max_length", max_length=tokenizer.model_max_length, truncation=True
        ).input_ids
        out = {
            "pixel_values": example["pixel_values"],
            "input_ids": torch.tensor(input_ids),
            "seed": int(rng.integers(2**62)),
        }
        return out | ({"mask": example["mask"]} if masks else {})

    def prompts(self, placeholder: str) -> list[str]:
        """Every prompt :meth:`example` can give (each caption, or each template), ``placeholder`` in its ``{}``."""
        captions = [item.caption for item in self.items]
        texts = [t for t in captions if t is not None] + (self.templates if None in captions else [])
        return [_fill(t, placeholder) for t in dict.fromkeys(texts)]

    def example(self, rng: np.random.Generator, placeholder: str) -> dict:
        """One augmented sample: ``pixel_values``, ``prompt`` (caption or template with ``placeholder``), ``mask``.

        Flips do not rewrite captions: use ``flip_p=0`` when captions name left and right.
        """
        item = self.items[int(rng.integers(len(self.items)))]
        pixels, mask = item.pixels, item.mask
        if rng.random() < self.flip_p:
            pixels = pixels.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        text = item.caption if item.caption is not None else self.templates[int(rng.integers(len(self.templates)))]
        out = {"pixel_values": pixels, "prompt": _fill(text, placeholder)}
        if mask is not None:
            out["mask"] = mask
        return out


def _fill(text: str, placeholder: str) -> str:
    """A caption or template with ``placeholder`` in its ``{}`` (text without one is used as it is)."""
    return text.format(placeholder) if "{}" in text else text


@dataclass
class ImageDataConfig:
    """A trainer's image folder and how its images are fitted to the training size."""

    train_data_dir: str = option(
        "",
        "folder of training images (captions in metadata.jsonl or .txt; a token's trainer reads {} as it)",
        place="hidden",
    )
    resolution: int = option(0, "training resolution (0 = the model's native size)", place="advanced")
    center_crop: bool = option(True, "crop to a centred square (else squash)", place="advanced")
    flip_p: float = option(
        0.5, "probability of a horizontal flip (use 0 when captions name left/right)", place="advanced"
    )

    def __post_init__(self):
        if not self.train_data_dir:
            raise ValueError("train_data_dir is empty: pass the folder of training images")
        if self.resolution < 0:
            raise ValueError(
                f"resolution must be 0 (the model's native size) or a size in pixels, got {self.resolution}"
            )

    def image_size(self, pipe) -> int:
        """The training side in pixels: ``resolution`` or the model's native size, a multiple the model accepts."""
        size, multiple = self.resolution or native_size(pipe), size_multiple(pipe)
        if size % multiple:
            raise ValueError(
                f"resolution {size} is not a multiple of {multiple}, which this model needs; pass 0 for its native "
                f"size ({native_size(pipe)}) or a multiple of {multiple}"
            )
        return size

    def read(self, pipe, learnable_property: str = "object") -> ImageFolder:
        return ImageFolder(
            self.train_data_dir, self.image_size(pipe), self.center_crop, self.flip_p, learnable_property
        )
