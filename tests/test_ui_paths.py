"""The app keeps to its folders: paths a request names must lie in the runs folder (or be uploads), the model switches
only among those the operator allowed, and a failed request leaves no run folder behind.

The handlers are called directly, without a server: the app is built on the bundled model and each endpoint's
function is called with its form's default values and the test's on top.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")


def call(demo, api_name: str, **values):
    """Calls endpoint ``api_name``'s handler as a request with the form's defaults and ``values`` would."""
    fn = next(f for f in demo.fns.values() if f.api_name == api_name)
    names = list(inspect.signature(fn.fn).parameters)[:-2]  # the inputs, then request and progress
    assert set(values) <= set(names), set(values) - set(names)
    given = {name: values.get(name, component.value) for name, component in zip(names, fn.inputs, strict=True)}
    return fn.fn(*given.values(), None, lambda *args, **kwargs: None)


def refusal(demo, api_name: str, **values) -> str:
    """The message with which endpoint ``api_name`` refuses a request."""
    with pytest.raises(gr.Error) as err:
        call(demo, api_name, **values)
    return err.value.message


def listing(folder: Path) -> list[str]:
    """Everything under ``folder`` (empty when it does not exist)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from genreg.ui import Workspace, build_app

    runs = tmp_path_factory.mktemp("app") / "runs"
    ws = Workspace("tinyworld", device="cpu", runs_dir=runs, models=["allowed/model"], model_switch=True)
    return build_app(ws)


@pytest.fixture
def runs(app, tmp_path, monkeypatch) -> Path:
    """A fresh runs folder for one test, inside ``tmp_path``: the rest of ``tmp_path`` is outside it."""
    folder = tmp_path / "runs"
    folder.mkdir()
    monkeypatch.setattr(app.workspace, "runs_dir", folder)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))  # gradio's upload folder, for this test
    (tmp_path / "outside.json").write_text("{}")
    (folder / "link.json").symlink_to(tmp_path / "outside.json")
    (folder / "link-dir").symlink_to(tmp_path)
    return folder


# Paths outside the runs folder, relative ones taken from the runs folder: existing, missing, escapes and symlinks.
OUTSIDE = {
    "existing": lambda runs: str(runs.parent / "outside.json"),
    "missing": lambda runs: str(runs.parent / "missing.json"),
    "dot-dot": lambda runs: "../outside.json",
    "dot-dot-missing": lambda runs: "../missing.json",
    "dot-dot-inside": lambda runs: str(runs / "sub" / ".." / ".." / "outside.json"),
    "symlink": lambda runs: "link.json",
    "symlink-folder": lambda runs: "link-dir/outside.json",
    "home": lambda runs: "~/outside.json",
}


def test_confined_accepts_only_paths_inside_the_runs_folder_or_uploads(app, runs):
    ws = app.workspace
    messages = set()
    for name, path in OUTSIDE.items():
        with pytest.raises(ValueError) as err:
            ws.confined(path(runs), "The file")
        messages.add(str(err.value))
        assert str(runs.parent) not in str(err.value), name
    assert messages == {"The file must be an uploaded file or a file in the runs folder 'runs': upload it instead"}

    assert ws.confined(runs / "linear_ag.json", "The file") == runs.resolve() / "linear_ag.json"
    assert ws.confined("sub/../linear_ag.json", "The file") == runs.resolve() / "linear_ag.json"
    upload = runs.parent / "uploads" / "0123abcd" / "linear_ag.json"
    assert ws.confined(upload, "The file") == upload.resolve()
    with pytest.raises(ValueError, match="must lie in the runs folder 'runs', the only folder a request may name"):
        ws.confined(upload, "The checkpoint", uploads=False)


@pytest.mark.parametrize(
    "field, api_name, values",
    [
        ("linear_ag_coefficients", "generate", {"guidance": "linear_ag"}),
        ("reference_file", "personalize", {"method": "cross-init"}),
        ("resume_from_checkpoint", "personalize", {"method": "cross-init", "run_folder": "run"}),
    ],
)
def test_each_path_field_refuses_paths_outside_the_runs_folder_alike(app, runs, field, api_name, values):
    before = listing(runs.parent)
    messages = {}
    for name, path in OUTSIDE.items():
        given = path(runs)
        if field == "resume_from_checkpoint" and not given.startswith(("/", "~")):
            given = f"../{given}"  # a checkpoint is named from the run folder, one level below the runs folder
        messages[name] = refusal(app, api_name, **values, **{field: given})
    assert len(set(messages.values())) == 1, messages  # the same, whether or not the path exists
    assert "runs folder 'runs'" in messages["existing"] and "outside" not in messages["existing"]
    assert listing(runs.parent) == before  # nothing written anywhere


def test_paths_inside_the_runs_folder_and_uploads_are_accepted(app, runs):
    from genreg.ui.forms import make_config

    from genreg.methods.adaptive_guidance import GenerateOptions
    from genreg.methods.cross_init import CrossInitConfig

    ws = app.workspace
    (runs / "linear_ag.json").write_text("{}")
    options = make_config(
        GenerateOptions, {"guidance": "linear_ag", "linear_ag_coefficients": "linear_ag.json"}, files=ws.confined
    )
    assert options.linear_ag_coefficients == str(runs.resolve() / "linear_ag.json")

    upload = runs.parent / "uploads" / "0123abcd" / "names.txt"
    upload.parent.mkdir(parents=True)
    upload.write_text("red circle\nblue square\n")
    config = make_config(CrossInitConfig, {"reference_file": str(upload)}, files=ws.confined, train_data_dir="data")
    assert config.words() == ["red circle", "blue square"]
    empty = make_config(CrossInitConfig, {"reference_file": None}, files=ws.confined, train_data_dir="data")
    assert empty.reference_file is None  # no upload: the field's default

    # A checkpoint of the run is accepted: the request goes on to find that the folder holds no run to resume.
    message = refusal(app, "personalize", method="cross-init", run_folder="run", resume_from_checkpoint="checkpoint-2")
    assert message.startswith("nothing to resume in run folder run")


def test_path_fields_are_uploads_in_the_forms(app):
    fn = next(f for f in app.fns.values() if f.api_name == "generate")
    names = list(inspect.signature(fn.fn).parameters)
    box = fn.inputs[names.index("linear_ag_coefficients")]
    assert isinstance(box, gr.File) and box.file_types == [".json"]
    fn = next(f for f in app.fns.values() if f.api_name == "personalize")
    names = list(inspect.signature(fn.fn).parameters)
    assert isinstance(fn.inputs[names.index("reference_file")], gr.File)
    assert isinstance(fn.inputs[names.index("resume_from_checkpoint")], gr.Textbox)  # 'latest' or a checkpoint-N


def test_load_model_loads_only_allowed_models_when_the_operator_allows_switching(app, tmp_path, monkeypatch):
    import genreg.ui.workspace as workspace

    ws = app.workspace
    assert ws.models == ("tinyworld", "allowed/model")
    fn = next(f for f in app.fns.values() if f.api_name == "load_model")
    assert [value for _, value in fn.inputs[0].choices] == list(ws.models)

    seen = []
    load = workspace.load_pipeline
    monkeypatch.setattr(workspace, "load_pipeline", lambda name, **kwargs: seen.append(name) or load(name, **kwargs))
    existing, missing = str(tmp_path), str(tmp_path / "missing")
    refused = {name: refusal(app, "load_model", model=name).replace(name, "NAME") for name in (existing, missing)}
    assert refused[existing] == refused[missing]  # the same, whether or not the path exists
    assert refused[existing] == "model 'NAME' is not offered by this server; choose one of tinyworld, allowed/model"
    assert seen == [] and ws.model_name == "tinyworld"

    assert "**tinyworld**" in call(app, "load_model", model="tinyworld")
    assert seen == ["tinyworld"]

    monkeypatch.setattr(ws, "model_switch", False)  # the default: the operator did not pass --allow-model-switch
    assert "--allow-model-switch" in refusal(app, "load_model", model="tinyworld")
    assert seen == ["tinyworld"]


def test_a_one_step_model_is_refused_and_the_model_keeps_serving(app, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from genreg.methods.score_forgetting import save_one_step_pipeline
    from genreg.testing import tiny_sd_components

    teacher = StableDiffusionPipeline(**tiny_sd_components())
    model = str(tmp_path / "generator")
    save_one_step_pipeline(teacher, teacher.unet, 440, Path(model))  # what train_sfd writes
    ws = app.workspace
    monkeypatch.setattr(ws, "models", (*ws.models, model))
    message = refusal(app, "load_model", model=model)
    assert "one-step generator" in message and f"genreg generate --model {model}" in message
    assert ws.model_name == "tinyworld"


def test_a_failed_training_request_leaves_the_runs_folder_as_it_was(app, runs, tmp_path, monkeypatch):
    (runs / "earlier").mkdir()
    (runs / "earlier" / "notes.txt").write_text("an earlier run")
    before = listing(runs)
    # The reference file lies in the runs folder but is missing: the trainer fails after the run folder was made.
    request = {"method": "cross-init", "reference_file": "names.txt", "max_train_steps": 2}
    assert "not found" in refusal(app, "personalize", **request)
    assert listing(runs) == before

    fresh = tmp_path / "fresh-runs"
    monkeypatch.setattr(app.workspace, "runs_dir", fresh)
    assert "not found" in refusal(app, "personalize", **request)
    assert not fresh.exists()  # the runs folder the request made is gone too


def test_a_run_record_names_its_method_and_subject_and_earlier_records_still_resume(app, runs):
    ws = app.workspace
    folder = runs / "run"
    data = ws.prepare_run(folder, "textual-inversion", "<cat>", False, lambda d: (d / "a.png").write_bytes(b""))
    assert (data / "a.png").is_file()
    assert '"subject": "<cat>"' in (folder / "genreg-app-run.json").read_text()
    assert ws.prepare_run(folder, "textual-inversion", "<cat>", True, None) == data
    with pytest.raises(ValueError, match="trains <cat> with textual-inversion"):
        ws.prepare_run(folder, "textual-inversion", "<dog>", True, None)
    (folder / "genreg-app-run.json").write_text('{"method": "sara", "placeholder_token": "red"}')  # an earlier app's
    assert ws.prepare_run(folder, "sara", "red", True, None) == data
