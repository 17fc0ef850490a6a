import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from genreg import load_pipeline
from genreg.cli import main
from genreg.tinyworld import model_path


def test_unknown_model_name_says_what_is_accepted():
    with pytest.raises(FileNotFoundError, match="neither a bundled model"):
        load_pipeline("tinyword")


def test_missing_directory_is_reported():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pipeline("./no/such/model/dir")


def test_directory_without_model_index(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        load_pipeline(tmp_path)


def test_uncached_hub_id_names_the_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="hf download someone/some-model"):
        load_pipeline("someone/some-model")


def test_load_pipeline_tinyworld_matches_plain_diffusers(tinyworld_pipe):
    pipe = load_pipeline("tinyworld", device="cpu")
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")
    a = pipe("a red circle on the left", generator=torch.Generator().manual_seed(1), **kwargs).images
    b = tinyworld_pipe("a red circle on the left", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert a.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(a, b)


def test_learned_token_saves_and_loads_with_load_textual_inversion(tmp_path):
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(model_path())
    pipe.set_progress_bar_config(disable=True)
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vec = (
        pipe.text_encoder.get_input_embeddings()
        .weight[pipe.tokenizer.convert_tokens_to_ids("star</w>")]
        .detach()
        .clone()
    )
    save_file({"<my-thing>": vec[None]}, str(tmp_path / "learned_embeds.safetensors"))
    pipe.load_textual_inversion(tmp_path, token="<my-thing>")
    assert pipe.text_encoder.get_input_embeddings().weight.shape[1] == dim
    token_id = pipe.tokenizer.convert_tokens_to_ids("<my-thing>")
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[token_id], vec)
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    learned = pipe("a red <my-thing> on the left", generator=torch.Generator().manual_seed(0), **kwargs).images
    word = pipe("a red star on the left", generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(learned, word, atol=1e-5)  # the token holds the word's embedding


def test_cli_generate_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "generate",
                "a red circle on the left",
                "a small blue square at the top",
                "--steps",
                "2",
                "--images-per-prompt",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (64, 128)
    assert "wrote" in capsys.readouterr().out


def test_a_score_forgetting_output_loads_and_generates_in_one_step(tmp_path, capsys):
    from genreg.pipelines import OneStepPipeline

    from genreg.methods.score_forgetting import save_one_step_pipeline
    from genreg.testing import tiny_sd_components

    teacher = StableDiffusionPipeline(**tiny_sd_components())
    model = tmp_path / "generator"
    save_one_step_pipeline(teacher, teacher.unet, 440, model)  # what train_sfd writes
    pipe = load_pipeline(model, device="cpu")
    assert isinstance(pipe, OneStepPipeline) and pipe.config.t_init == 440 and pipe.dtype == torch.float32
    prompts = ["a red circle", "a blue square"]
    generators = [torch.Generator().manual_seed(k) for k in range(4)]
    images = pipe(prompts, num_images_per_prompt=2, generator=generators).images
    assert [im.size for im in images] == [(32, 32)] * 4

    out = tmp_path / "grid.png"
    assert main(["generate", *prompts, "--model", str(model), "--images-per-prompt", "2", "--out", str(out)]) == 0
    assert "one step" in capsys.readouterr().out
    grid = np.asarray(Image.open(out))
    assert grid.shape == (64, 64, 3)  # a row per prompt, drawn from seeds 0..3 as above
    np.testing.assert_array_equal(grid[32:, :32], np.asarray(images[2]))

    assert main(["generate", "a red circle", "--model", str(model), "--steps", "10", "--guidance", "cfg"]) == 2
    err = capsys.readouterr().err
    assert "one-step generator" in err and "guidance, num_inference_steps" in err and "Traceback" not in err

    # Editing and training run many steps: they refuse the generator and name the command that draws with it.
    photo = tmp_path / "data" / "red.png"
    photo.parent.mkdir()
    Image.new("RGB", (32, 32), "red").save(photo)
    assert main(["edit", str(photo), "--model", str(model), "--out", str(tmp_path / "edited.png")]) == 2
    err = capsys.readouterr().err
    assert "`genreg edit` needs a multi-step model" in err and f"genreg generate --model {model}" in err
    out = tmp_path / "ti"
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(photo.parent)]
    argv += ["--output_dir", str(out)]
    assert main(["train", "textual-inversion", *argv, "--placeholder_token", "<me>"]) == 2
    assert "`genreg train textual-inversion` needs a multi-step model" in capsys.readouterr().err
    assert not (tmp_path / "edited.png").exists() and not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "  "], "is empty"),
        (["generate", "a red circle", "--steps", "-3"], "num_inference_steps must be a positive"),
        (["generate", "a red circle", "--guidance-scale", "-1"], "guidance_scale must be a finite number >= 0"),
        (["generate", "a red circle", "--model", "nosuchmodel"], "neither a bundled model"),
    ],
)
def test_cli_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("genreg: error:") and message in err and "Traceback" not in err


def test_cli_evaluate_refuses_a_non_image_file(tmp_path, capsys):
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    assert main(["evaluate", str(bogus), "--prompt", "a red circle"]) == 2
    assert "not a readable image file" in capsys.readouterr().err


def test_cli_evaluate_scores_a_render(tmp_path, capsys):
    from genreg.tinyworld import Obj, Scene, render

    path = tmp_path / "scene.png"
    render(Scene((Obj("triangle", "yellow", "large", "right"),), "black"))[0].save(path)
    assert main(["evaluate", str(path), "--prompt", "a large yellow triangle on the right, black background"]) == 0
    out = capsys.readouterr().out
    assert "right: triangle yellow large" in out and "all_correct=1.000" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "a red circle", "--guidance_scale", "inf"], "guidance_scale must be a finite number"),
        (["generate", "a red circle", "--gamma_bar", "nan"], "gamma_bar must be a finite number"),
        (["generate", "a red circle", "--seed", str(2**64)], "seed must be a whole number from 0 to 2**63 - 1"),
        (["generate", "a red \udcff circle"], "is not valid text"),
        (["generate", "a red circle", "--device", "banana"], "is not a device name"),
        (["generate", "a red circle", "--out", "grid.unknown"], "no image extension"),
    ],
)
def test_cli_refuses_bad_values_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("genreg: error:") and message in err and "Traceback" not in err


def test_cli_output_checks(tmp_path, capsys):
    (tmp_path / "folder.png").mkdir()
    assert main(["generate", "a red circle", "--out", str(tmp_path / "folder.png")]) == 2
    assert "is a folder" in capsys.readouterr().err
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "white").save(image)
    edit = ["edit", str(image), "--source", "a red circle", "--target", "a blue circle", "--out", str(image)]
    assert main(edit) == 2
    assert "would overwrite it" in capsys.readouterr().err
    assert Image.open(image).getpixel((0, 0)) == (255, 255, 255)  # the original is untouched


def test_a_plain_command_is_quiet_unless_verbose(tmp_path, capfd):
    argv = ["generate", "a red circle", "--steps", "2", "--num_images", "1", "--out", str(tmp_path / "g.png")]
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert "Loading pipeline components" not in err and "Loading weights" not in err and "float32" not in err
    assert "2/2" in err  # the sampling progress bar stays
    assert main([*argv, "--verbose"]) == 0
    assert "Loading pipeline components" in capfd.readouterr().err
    train = ["train", "textual-inversion", "--train_data_dir", str(tmp_path), "--resolution", "1"]
    assert main(train) == 2  # refused after loading the model, whose size rule it needs
    err = capfd.readouterr().err
    assert "Loading pipeline components" not in err and "resolution 1 is not a multiple of 16" in err


@pytest.mark.parametrize("damage", ["truncated unet", "bad index", "missing component"])
def test_a_damaged_model_directory_is_a_clear_error(tmp_path, damage, capsys):
    from diffusers import StableDiffusionPipeline

    from genreg.testing import tiny_sd_components

    StableDiffusionPipeline(**tiny_sd_components()).save_pretrained(tmp_path)
    if damage == "truncated unet":
        weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "bad index":
        (tmp_path / "model_index.json").write_text("{ not json")
    else:
        import shutil

        shutil.rmtree(tmp_path / "vae")
    capsys.readouterr()  # what saving printed
    assert main(["generate", "a red circle", "--model", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genreg: error: cannot load the model in") and "Traceback" not in err
