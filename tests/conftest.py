import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tinyworld_pipe():
    from diffusers import StableDiffusionPipeline

    from genreg.tinyworld import model_path

    pipe = StableDiffusionPipeline.from_pretrained(model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def evaluator():
    from genreg.tinyworld import Evaluator

    return Evaluator.load()


@pytest.fixture
def gen():
    return torch.Generator("cpu").manual_seed(0)
