"""The app's shared state: one loaded model and the pipelines of the registered methods built on it with
``from_pipe``, the run folders of training jobs, and the Stop signal of each browser session.

The server's files stay its own: a path a request names is accepted only inside the runs folder (or, for a file the
user brings, gradio's upload folder), and the model is switched only among those the operator allowed, and only when
the operator allows switching at all.

Data flows one way: the tabs call the workspace and read what it returns; the workspace knows no tab. Everything here
runs inside one GPU-bound job at a time (the app's concurrency group); the lock only guards against a caller that
bypasses the queue.
"""

from __future__ import annotations

import atexit
import copy
import importlib
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from gradio.utils import get_upload_folder

import genreg.methods  # noqa: F401  (registers every method)
from genreg import registry
from genreg.adapters import LORA_FILE
from genreg.embeddings import load_learned_embeds, placeholder_names, require_new_tokens
from genreg.io import load_image
from genreg.models import BUNDLED, load_pipeline, require_multi_step
from genreg.registry import Method
from genreg.video import with_motion

logger = logging.getLogger(__name__)

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
RUN_FILE = "genreg-app-run.json"  # what the app needs to resume a run: method and subject


@dataclass
class JobRecord:
    """One finished job: its kind ("generate", "edit", ...), browser session and monotonic start and end times."""

    kind: str
    session: str
    start: float
    end: float


@contextmanager
def preserved(*modules: torch.nn.Module) -> Iterator[None]:
    """Restores the train/eval mode and ``requires_grad`` flags of ``modules`` (trainers freeze and switch modes)."""
    modes = [[(m, m.training) for m in module.modules()] for module in modules]
    flags = [[(p, p.requires_grad) for p in module.parameters()] for module in modules]
    try:
        yield
    finally:
        for group in modes:
            for m, training in group:
                m.training = training
        for group in flags:
            for p, flag in group:
                p.requires_grad_(flag)


def pipeline_class(method: Method, base: DiffusionPipeline) -> type | None:
    """The pipeline class of ``method`` for the model family of ``base``: ``method.pipeline`` (a dotted name such as
    "genreg.pipelines.GuideAndRescalePipeline") for SD 1.x/2.x, and its SDXL sibling of the same module, named with
    "XLPipeline" in place of "Pipeline", for SDXL. None where the method has no pipeline for that family."""
    if method.pipeline is None:
        return None
    module, _, name = method.pipeline.rpartition(".")
    if isinstance(base, StableDiffusionXLPipeline):
        name = name.removesuffix("Pipeline") + "XLPipeline"
    return getattr(importlib.import_module(module), name, None)


def tuned_unet_result(run: str | Path | None) -> Path | None:
    """A run folder's second-stage UNet result: its ``unet/`` folder or LoRA weights file, or None."""
    if run is None:
        return None
    found = [f for f in (Path(run) / "unet", Path(run) / LORA_FILE) if f.exists()]
    return found[0] if found else None


def slug(text: str) -> str:
    """``text`` as a folder-name part: letters and digits, runs of anything else as one '-'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "run"


class Workspace:
    """One model shared by every tab; the pipelines of the methods are views of it (``from_pipe``).

    ``models`` are the models a request may switch to besides ``model`` and the bundled ones, and only with
    ``model_switch``: switching replaces the model of every user, so it is the operator's choice. ``model_config``
    (a diffusers directory or 'tinyworld') gives the configs of any single-file ``.safetensors`` model among them.
    """

    def __init__(
        self,
        model: str = "tinyworld",
        device: str | None = None,
        dtype: torch.dtype | None = None,
        runs_dir: str | Path = "genreg-runs",
        models: Iterable[str] = (),
        model_switch: bool = False,
        model_config: str | None = None,
    ):
        self.runs_dir = Path(runs_dir)
        self.model_config = model_config
        self.model_switch = model_switch
        self.scratch = Path(tempfile.mkdtemp(prefix="genreg-app-"))
        atexit.register(shutil.rmtree, self.scratch, ignore_errors=True)
        self.history: list[JobRecord] = []
        self._device, self._dtype = device, dtype
        self._lock = threading.Lock()
        self._stops: dict[str, threading.Event] = {}
        self._personal: tuple[tuple, DiffusionPipeline] | None = None
        self._video: dict[str | None, DiffusionPipeline] | None = None
        self.load(model)
        names = (name.strip() for name in (self.model_name, *BUNDLED, *models))
        self.models = tuple(dict.fromkeys(name for name in names if name))

    # ----------------------------------------------------------------------------------------------------------------
    # the model

    def load(self, name: str) -> None:
        """Loads ``name`` ('tinyworld', a diffusers directory, a single file or a cached hub id) and builds the method
        pipelines."""
        name = (name or "").strip()
        started = time.perf_counter()
        single_file = Path(name).suffix == ".safetensors" and Path(name).expanduser().is_file()
        config = self.model_config if single_file else None
        base = load_pipeline(name, device=self._device, dtype=self._dtype, config=config)
        if not isinstance(base, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
            raise ValueError(
                f"{name} holds a {type(base).__name__}; the app works with Stable Diffusion 1.x/2.x and SDXL "
                "text-to-image models"
            )
        require_multi_step(base, name, "the app")
        base.set_progress_bar_config(disable=True)
        pipes = {}
        for method in (m for m in registry.methods() if m.kind != "video"):  # those: ``video_pipeline``
            cls = pipeline_class(method, base)
            if cls is not None:
                pipes[method.name] = cls.from_pipe(base)
        # Swapped in only once everything is built: a model that fails to load leaves the previous one serving.
        self.base, self.model_name, self._pipes = base, name, pipes
        self.load_seconds = time.perf_counter() - started
        self._personal = self._video = None

    def switch(self, name: str) -> None:
        """Loads ``name`` for every tab, if the operator allows switching and lists ``name``; the name is checked
        against that list before anything on disk is looked at."""
        if not self.model_switch:
            raise ValueError(
                "the model of this server is fixed: its operator lets users switch it with --allow-model-switch"
            )
        name = (name or "").strip()
        if name not in self.models:
            raise ValueError(f"model {name!r} is not offered by this server; choose one of {', '.join(self.models)}")
        self.load(name)

    def pipeline(self, method: Method) -> DiffusionPipeline:
        """The pipeline of ``method`` on the loaded model (it shares the model's weights)."""
        pipe = self._pipes.get(method.name)
        if pipe is None:
            raise ValueError(
                f"{method.title} has no pipeline for {type(self.base).__name__} models; load another model"
            )
        return pipe

    def video_pipeline(self, method: Method | None = None) -> DiffusionPipeline:
        """AnimateDiff over the loaded model (``genreg.video.with_motion``), or the pipeline of video ``method`` over
        it, built on first use: genreg bundles a motion adapter for the tiny world only."""
        if self._video is None:
            if not self.is_bundled:
                raise ValueError(
                    f"video needs a motion adapter made for {self.model_name}, and the app has the bundled tiny-world "
                    "one only: load 'tinyworld' here, or use `genreg generate-video --model M --motion-adapter DIR`"
                )
            view = with_motion(self.base, "tinyworld")
            view.set_progress_bar_config(disable=True)
            self._video = {None: view}
        if method is not None and method.name not in self._video:
            self._video[method.name] = pipeline_class(method, self.base).from_pipe(self._video[None])
        return self._video[method.name if method else None]

    @property
    def is_bundled(self) -> bool:
        """Whether the loaded model is bundled with genreg (the tiny world)."""
        return self.model_name in BUNDLED

    @property
    def can_edit(self) -> bool:
        """Whether some registered editor has a pipeline for the loaded model."""
        return any(m.name in self._pipes for m in registry.methods("editor"))

    @property
    def native_size(self) -> int:
        """The image side the loaded model was trained at (sample size of the UNet times the VAE's factor)."""
        size = self.base.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.base.vae_scale_factor

    @property
    def mixed_precision(self) -> str:
        """Training autocast that matches the frozen weights' dtype (as the training scripts choose it)."""
        if self.base.dtype == torch.bfloat16:
            return "bf16"
        return "fp16" if self.base.dtype == torch.float16 and self.base.device.type == "cuda" else "no"

    def describe(self) -> str:
        """The loaded model in one line of Markdown."""
        size = self.native_size
        return (
            f"**{self.model_name}**: {type(self.base).__name__}, {size}x{size} px · device `{self.base.device}` · "
            f"dtype `{str(self.base.dtype).removeprefix('torch.')}` · loaded in {self.load_seconds:.1f} s"
        )

    # ----------------------------------------------------------------------------------------------------------------
    # jobs and Stop

    @contextmanager
    def job(self, kind: str, session: str) -> Iterator[threading.Event]:
        """One GPU-bound job of browser session ``session``; yields the event its Stop button sets."""
        stop = self._stops.setdefault(session, threading.Event())
        with self._lock:
            stop.clear()
            start = time.monotonic()
            try:
                yield stop
            finally:
                self.history.append(JobRecord(kind, session, start, time.monotonic()))
                del self.history[:-100]

    def stop(self, session: str) -> None:
        """Asks the running job of ``session`` to stop after its current step."""
        self._stops.setdefault(session, threading.Event()).set()

    # ----------------------------------------------------------------------------------------------------------------
    # personalization

    def personalized(self, embeds: str | Path, sampler: Method, tuned: str | Path | None = None) -> DiffusionPipeline:
        """The pipeline of ``sampler`` with a learned token loaded into its own copy of the text encoder and tokenizer,
        and, where the run folder ``tuned`` holds a tuned UNet (``unet/``) or LoRA weights (a two-stage trainer's
        second stage), its own UNet with them.

        The shared model never sees the token or the tuning; the last one built is kept for the next request.
        """
        embeds = Path(embeds)
        if not embeds.is_file():
            raise FileNotFoundError(f"embeddings file {embeds.name} not found: train a token or upload one")
        if embeds.suffix != ".safetensors":
            raise ValueError(f"{embeds.name} is not a .safetensors file; upload a learned_embeds.safetensors")
        unet_result = tuned_unet_result(tuned)
        stamps = [(str(f), f.stat().st_mtime_ns) for f in (embeds, unet_result) if f is not None]
        key = (*stamps, id(self.base), sampler.name)
        if self._personal is not None and self._personal[0] == key:
            return self._personal[1]
        if getattr(self.base, "text_encoder_2", None) is not None:
            raise ValueError("learned tokens are supported on SD 1.x/2.x models (one text encoder), not SDXL yet")
        text_encoder, tokenizer = copy.deepcopy(self.base.text_encoder), copy.deepcopy(self.base.tokenizer)
        parts = {"text_encoder": text_encoder, "tokenizer": tokenizer}
        if unet_result is not None:
            parts["unet"] = self._tuned_unet(unet_result)
        pipe = type(self.pipeline(sampler)).from_pipe(self.base, **parts)
        pipe.set_progress_bar_config(disable=True)
        try:
            token, vectors = load_learned_embeds(embeds)  # refuses damaged (non-finite) vectors
            require_new_tokens(tokenizer, placeholder_names(token, len(vectors)))  # no word is taken over
            pipe.load_textual_inversion(str(embeds))
        except Exception as err:  # diffusers raises several kinds for a file that is not a token embedding
            raise ValueError(f"{embeds.name} is not a usable token embedding for this model: {err}") from err
        self._personal = (key, pipe)
        return pipe

    def _tuned_unet(self, result: Path) -> torch.nn.Module:
        """A copy of the shared UNet with a second stage's result: a whole tuned ``unet/`` or LoRA weights."""
        base = self.base.unet
        if result.is_dir():
            unet = type(base).from_pretrained(result, torch_dtype=base.dtype)
            return unet.to(base.device)
        unet = copy.deepcopy(base)
        unet.load_lora_adapter(str(result), prefix="unet", adapter_name="tuned")
        return unet

    def confined(self, path: str | Path, what: str, base: Path | None = None, uploads: bool = True) -> Path:
        """``path`` resolved (``~``, ``..`` and symlinks; relative to ``base``, by default the runs folder) when it
        lies in the runs folder or, with ``uploads``, in gradio's upload folder; otherwise a ValueError that says the
        same whether or not the path exists."""
        roots = [self.runs_dir.resolve(), *([Path(get_upload_folder()).resolve()] if uploads else [])]
        try:
            resolved = ((base or self.runs_dir) / Path(path).expanduser()).resolve()
        except (OSError, RuntimeError):  # a symlink loop, an unreadable folder: refused like any path outside
            resolved = None
        if resolved is None or not any(resolved.is_relative_to(root) for root in roots):
            where = f"the runs folder {self.runs_dir.name!r}"
            if uploads:
                raise ValueError(f"{what} must be an uploaded file or a file in {where}: upload it instead")
            raise ValueError(f"{what} must lie in {where}, the only folder a request may name")
        return resolved

    @contextmanager
    def cleaned_up(self, folder: Path) -> Iterator[None]:
        """Deletes what the block created of run folder ``folder`` (the runs folder too) when the block fails before
        the run wrote a checkpoint: a failed request leaves no folder behind."""
        from genreg.training import list_checkpoints

        created = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            yield
        except BaseException:
            if created and not list_checkpoints(folder):
                shutil.rmtree(created[-1], ignore_errors=True)
            raise

    def run_folder(self, name: str, method: str, subject: str) -> Path:
        """The folder of a training run under ``runs_dir``: ``name``, or a new one named after method and subject (a
        placeholder token, a concept, or "images")."""
        name = (name or "").strip()
        if not name:
            stem = f"{method}-{slug(subject)}-{time.strftime('%Y%m%d-%H%M%S')}"
            folder, n = self.runs_dir / stem, 1
            while folder.exists():
                n += 1
                folder = self.runs_dir / f"{stem}-{n}"
            return folder
        if not RUN_NAME.match(name):
            raise ValueError(
                f"run folder {name!r} must be a plain folder name (letters, digits, '.', '_', '-'): runs are kept "
                f"in {self.runs_dir}"
            )
        return self.runs_dir / name

    def prepare_run(self, folder: Path, method: str, subject: str, resume: bool, fill: Callable[[Path], None]) -> Path:
        """Checks that ``folder`` suits a new or resumed run and has ``fill(data)`` write a new run's training data
        (a kit, or uploads); returns the data folder. A resumed run keeps its own data."""
        from genreg.training import list_checkpoints

        data = folder / "data"
        record = folder / RUN_FILE
        if resume:
            if not record.is_file() or not data.is_dir():
                raise ValueError(
                    f"nothing to resume in run folder {folder.name}: it holds no run started by the app; clear "
                    "'Resume from checkpoint' to start a new run"
                )
            saved = json.loads(record.read_text())
            saved_subject = saved.get("subject", saved.get("placeholder_token"))  # the key of earlier app versions
            if saved.get("method") != method or saved_subject != subject:
                raise ValueError(
                    f"run folder {folder.name} trains {saved_subject} with {saved.get('method')}; "
                    "resume it with the same method and subject, or start a new run"
                )
            return data
        if list_checkpoints(folder):
            raise ValueError(
                f"run folder {folder.name} already holds a run: set 'Resume from checkpoint' to 'latest' to continue "
                "it, or choose another folder name"
            )
        # A run that failed before its first checkpoint left only its data behind: start it afresh.
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        fill(data)
        record.write_text(json.dumps({"method": method, "subject": subject}) + "\n")
        return data

    @staticmethod
    def write_uploads(uploads: list[str], data: Path, captions: bool = False) -> None:
        """Writes uploaded images into ``data`` (as PNG; with ``captions``, under their own names, beside the uploaded
        ``.txt`` captions and ``metadata.jsonl``); refuses an unreadable one by name."""
        if not uploads:
            raise ValueError("no training images: upload a few images, or pick a tiny-world kit")
        for i, path in enumerate(uploads):
            path = Path(path)
            if captions and (path.suffix == ".txt" or path.name == "metadata.jsonl"):
                shutil.copyfile(path, data / path.name)
                continue
            try:
                image = load_image(path)
            except (ValueError, FileNotFoundError):
                raise ValueError(
                    f"{path.name} is not a readable image file; upload PNG, JPEG or WebP images"
                ) from None
            if captions:
                shutil.copyfile(path, data / path.name)
            else:
                image.save(data / f"{i:02d}-{slug(path.stem)}.png")

    def train(self, method: Method, config, train_config, **fit_kwargs) -> Path:
        """Runs trainer ``method`` (``method.run``) on a private copy of the text encoder and tokenizer.

        Trainers add the placeholder token to the pipeline they are given; the copy keeps the shared model clean, and
        the frozen UNet and VAE get their modes and flags back afterwards.
        """
        if getattr(self.base, "text_encoder_2", None) is not None:
            raise ValueError("token training supports SD 1.x/2.x models (one text encoder), not SDXL yet")
        text_encoder, tokenizer = copy.deepcopy(self.base.text_encoder), copy.deepcopy(self.base.tokenizer)
        pipe = type(self.base).from_pipe(self.base, text_encoder=text_encoder, tokenizer=tokenizer)
        pipe.set_progress_bar_config(disable=True)
        with preserved(self.base.unet, self.base.vae):
            return method.run(pipe, config, train_config, **fit_kwargs)

    def keep(self, path: str | Path, name: str | None = None) -> Path:
        """A copy of ``path`` in the app's scratch folder, which the app may serve for download."""
        return Path(shutil.copy(path, self.scratch_dir() / (name or Path(path).name)))

    def scratch_dir(self) -> Path:
        """A new folder in the app's scratch folder (deleted when the app exits)."""
        return Path(tempfile.mkdtemp(dir=self.scratch))
