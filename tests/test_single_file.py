"""Single-file checkpoints (one .safetensors in the original SD layout, as other UIs save them), loaded offline with
the configs of a local diffusers directory."""

import shutil
import socket
import sys

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from genreg import load_pipeline
from genreg.cli import main
from genreg.testing import original_sd_state_dict, tiny_sd_components
from genreg.tinyworld import model_path

PROMPT = "a red circle on the left"


@pytest.fixture
def no_network(monkeypatch):
    """Fails the test if anything calls huggingface_hub's download functions or opens a socket connection."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"a network access was attempted: {args}")

    for name in ("hf_hub_download", "snapshot_download"):
        original = getattr(huggingface_hub, name)
        for module in list(sys.modules.values()):  # wherever it was imported by name (diffusers, transformers, ...)
            if module is not None and vars(module).get(name) is original:
                monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
    assert not attempts


@pytest.fixture(scope="module")
def reference():
    """The bundled model as a directory, as it is now (a training run may replace its weights between sessions)."""
    pipe = load_pipeline("tinyworld", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def single_file(reference, tmp_path_factory):
    """The reference's UNet, VAE and text encoder in one .safetensors file with the original key names."""
    path = tmp_path_factory.mktemp("checkpoints") / "tinyworld.safetensors"
    save_file(original_sd_state_dict(reference), path)
    return path


def _render(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, generator=generator, output_type="np").images


def _assert_same_weights(pipe, reference) -> None:
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_the_file_is_in_the_original_layout(single_file):
    keys = load_file(single_file).keys()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)  # no diffusers names left


def test_a_single_file_loads_the_weights_and_renders_the_images_of_the_directory(reference, single_file, no_network):
    pipe = load_pipeline(single_file, device="cpu", config="tinyworld")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is StableDiffusionPipeline and pipe.dtype == torch.float32
    _assert_same_weights(pipe, reference)
    assert pipe.tokenizer.get_vocab() == reference.tokenizer.get_vocab()  # the tiny tokenizer of the config dir
    assert dict(pipe.scheduler.config) == dict(reference.scheduler.config)
    np.testing.assert_array_equal(_render(pipe), _render(reference))


def test_the_config_directory_needs_configs_only(reference, single_file, tmp_path, no_network):
    configs = tmp_path / "repo"  # the model's repository folder without its weights
    shutil.copytree(model_path(), configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(configs.rglob("*.safetensors")) and (configs / "model_index.json").is_file()
    _assert_same_weights(load_pipeline(single_file, device="cpu", config=configs), reference)


def test_the_cli_generates_from_a_single_file(single_file, tmp_path, capsys, no_network):
    out = tmp_path / "grid.png"
    argv = ["generate", PROMPT, "--steps", "2", "--images-per-prompt", "1", "--model", str(single_file)]
    assert main([*argv, "--model-config", "tinyworld", "--out", str(out)]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert main([*argv, "--out", str(out)]) == 2
    assert "--model-config" in capsys.readouterr().err


def test_without_a_config_the_error_says_what_to_pass(single_file):
    with pytest.raises(ValueError, match="needs a config.*local diffusers directory.*'tinyworld'"):
        load_pipeline(single_file, device="cpu")


@pytest.mark.parametrize("config", ["someone/some-model", "no/such/dir"])
def test_a_config_must_be_a_local_diffusers_directory(single_file, config, tmp_path, no_network):
    with pytest.raises(ValueError, match="not a local diffusers directory"):
        load_pipeline(single_file, device="cpu", config=config)
    with pytest.raises(ValueError, match="not a local diffusers directory"):
        load_pipeline(single_file, device="cpu", config=tmp_path)  # a folder without model_index.json


def test_a_directory_model_refuses_a_config():
    with pytest.raises(ValueError, match="only for single-file checkpoints"):
        load_pipeline("tinyworld", device="cpu", config="tinyworld")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickled_checkpoints_are_refused_with_the_conversion(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"pickled checkpoint.*Convert it.*\.safetensors"):
        load_pipeline(path, device="cpu", config="tinyworld")


def test_a_file_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a .safetensors checkpoint"):
        load_pipeline(path, device="cpu", config="tinyworld")


def _write(path, state_dict):
    save_file(state_dict, path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: original_sd_state_dict(StableDiffusionPipeline(**tiny_sd_components())), "expected shape"),
        (lambda: {"weight": torch.zeros(2)}, "appear to be missing"),  # not an SD checkpoint
        (lambda: load_file(model_path() / "unet/diffusion_pytorch_model.safetensors"), "appear to be missing"),
    ],
)
def test_a_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, make, message, no_network):
    path = _write(tmp_path / "other.safetensors", make())
    with pytest.raises(ValueError, match=f"cannot load .*{message}.*pass the config of the model it was trained"):
        load_pipeline(path, device="cpu", config="tinyworld")


@pytest.mark.parametrize(
    "dropped, message",
    [
        ("model.diffusion_model.out.2.weight", "lacks some of the weights"),  # diffusers fails on the unset weight
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "lacks 1 of the text_encoder's weights"),
        ("cond_stage_model.", "Weights for this component appear to be missing"),
    ],
)
def test_a_checkpoint_missing_weights_is_a_clear_error(single_file, tmp_path, dropped, message, no_network):
    kept = {k: v for k, v in load_file(single_file).items() if not k.startswith(dropped)}
    with pytest.raises(ValueError, match=message):
        load_pipeline(_write(tmp_path / "partial.safetensors", kept), device="cpu", config="tinyworld")


def test_a_damaged_file_is_a_clear_error(tmp_path):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot load"):
        load_pipeline(path, device="cpu", config="tinyworld")


def test_the_app_serves_a_single_file_with_the_operators_config(reference, single_file, tmp_path, no_network):
    from genreg.ui.workspace import Workspace

    ws = Workspace(str(single_file), runs_dir=tmp_path / "runs", model_config="tinyworld")
    for name, tensor in reference.unet.state_dict().items():
        torch.testing.assert_close(ws.base.unet.state_dict()[name], tensor, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs a config"):
        Workspace(str(single_file), runs_dir=tmp_path / "runs")
