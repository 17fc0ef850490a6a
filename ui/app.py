"""The genreg web app: one tab per kind of method in the registry, over one shared model.

The tabs are generated from ``genreg.registry``: each kind with a registered method and a tab module below gets its
tab (samplers: Generate, editors: Edit, trainers: Personalize, finetuners: Fine-tune, unlearners: Unlearn, searches:
Memorization, video methods: Video), whose form comes from the methods' config dataclasses and their fields' ``place``
metadata. The work is
done by the method pipelines, trainers and searches; the app lays out, validates input into configs, reports progress
and shows results. Every GPU-bound event is in the concurrency group
``"gpu"`` with a limit of one, so jobs run one at a time and the others wait in the queue with their position shown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import gradio as gr

import genreg.methods  # noqa: F401  (registers every method)
from genreg import registry

from . import edit_tab, finetune_tab, generate_tab, memorization_tab, train_tab, unlearn_tab, video_tab
from .common import GPU, endpoint, session_of, stop_buttons
from .workspace import Workspace

CSS = """
.pixelated img { image-rendering: pixelated; }
"""

# The tab of each kind of method: (label, id, builder). A kind without a registered method gets no tab.
TABS: dict[str, tuple[str, str, Callable]] = {
    "sampler": ("Generate", "generate", generate_tab.build),
    "editor": ("Edit", "edit", edit_tab.build),
    "trainer": ("Personalize", "personalize", train_tab.build),
    "finetuner": ("Fine-tune", "finetune", finetune_tab.build),
    "unlearner": ("Unlearn", "unlearn", unlearn_tab.build),
    "search": ("Memorization", "memorization", memorization_tab.build),
    "video": ("Video", "video", video_tab.build),
}


def _model_picker(ws: Workspace) -> None:
    """The model box and its ``/load_model`` endpoint: loading replaces the model of every tab, so the endpoint loads
    only a model the operator allowed, and only where the operator allows switching (``Workspace.switch``)."""
    switch = ws.model_switch
    with gr.Row():
        model_box = gr.Dropdown(
            choices=list(ws.models),
            value=ws.model_name,
            label="Model",
            info="switching changes the model for everyone" if switch else "chosen by the server's operator",
            interactive=switch,
            scale=3,
        )
        load_btn = gr.Button("Load model", scale=0, min_width=160, visible=switch)
    model_info = gr.Markdown(ws.describe())

    def load_model(values, request, progress):
        with ws.job("load", session_of(request)):
            progress(0, desc=f"loading {values['model']}")
            ws.switch(values["model"])
        return ws.describe()

    load_btn.click(endpoint(["model"], load_model), [model_box], [model_info], api_name="load_model", **GPU)


def build_app(ws: Workspace) -> gr.Blocks:
    """The Blocks app over workspace ``ws`` (one loaded model)."""
    # Gradio's own upload and result cache: files older than a day are deleted, checked every hour.
    with gr.Blocks(title="genreg", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(
            "# genreg\nGenerate with fewer network evaluations, edit real images, and teach the model new subjects. "
            "One job runs at a time; others wait in the queue."
        )
        _model_picker(ws)
        stop_button = stop_buttons(ws)
        with gr.Tabs():
            for kind, (label, tab_id, build) in TABS.items():
                methods = registry.methods(kind)
                if methods:
                    with gr.Tab(label, id=tab_id):
                        build(ws, methods, stop_button)
    demo.workspace = ws  # what tests and callers read back (history of jobs, the loaded model)
    return demo


def theme() -> gr.themes.Base:
    """The default look with the system's fonts, so a page never asks a font server for anything."""
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(
    model: str = "tinyworld",
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str | None = None,
    dtype=None,
    runs_dir: str | Path = "genreg-runs",
    models: Iterable[str] = (),
    model_switch: bool = False,
    model_config: str | None = None,
    block: bool = True,
    quiet: bool = False,
) -> gr.Blocks:
    """Loads ``model``, builds the app and serves it on ``host:port`` (127.0.0.1 by default: this machine only).

    Users may switch the shared model only with ``model_switch``, and only to ``model``, the bundled models and
    ``models``; ``model_config`` gives the configs of a single-file checkpoint among them. With ``block=False`` it
    returns the running app at once (``demo.close()`` stops it).
    """
    ws = Workspace(
        model,
        device=device,
        dtype=dtype,
        runs_dir=runs_dir,
        models=models,
        model_switch=model_switch,
        model_config=model_config,
    )
    demo = build_app(ws)
    demo.queue(default_concurrency_limit=1)
    try:
        _, url, _ = demo.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=True,
            show_error=True,
            quiet=True,
            ssr_mode=False,
            mcp_server=False,
            enable_monitoring=False,
            max_file_size="100mb",
            theme=theme(),
            css=CSS,
        )
    except OSError as err:
        raise ValueError(f"cannot serve on {host}:{port} ({err}); pass another --port or --host") from None
    if not quiet:
        print(f"genreg app running on {url} (model {ws.model_name}); press Ctrl+C to stop", flush=True)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo
