import random

import numpy as np
import pytest
import torch

from genreg.tinyworld import Obj, Scene, render, render_many, sample_scene, scene_prompt


@pytest.fixture(scope="module")
def renders():
    rng = random.Random(777)
    scenes = [sample_scene(rng, holdout=False) for _ in range(300)]
    return render_many(scenes), scenes


def test_reads_every_attribute_of_fresh_renders(evaluator, renders):
    images, scenes = renders
    acc = evaluator.accuracy(images, scenes)
    assert set(acc) == {"count", "background", "position", "shape", "color", "size", "pattern", "outline"}
    for name, value in acc.items():
        assert value >= 0.97, (name, value)


def test_score_against_prompts(evaluator, renders):
    images, scenes = renders
    prompts = [scene_prompt(s, background=True) for s in scenes]
    good = evaluator.score(images, prompts)
    assert good["all_correct"] >= 0.95 and good["n"] == len(prompts)
    # The same images against prompts that name another colour for every object.
    swap = {
        "red": "green",
        "green": "blue",
        "blue": "yellow",
        "yellow": "orange",
        "orange": "purple",
        "purple": "cyan",
        "cyan": "red",
    }
    wrong = [" ".join(swap.get(w, w) for w in p.split()) for p in prompts]
    bad = evaluator.score(images, wrong)
    assert bad["color"] <= 0.05 and bad["all_correct"] <= 0.05
    assert bad["shape"] >= 0.95  # only colour changed


def test_details_are_scored_only_where_the_prompt_names_them(evaluator, renders):
    images, scenes = renders
    plain = evaluator.score(images, [scene_prompt(s) for s in scenes])
    assert "pattern" not in plain and "outline" not in plain
    named = evaluator.score(images, [scene_prompt(s, details=True) for s in scenes])
    assert named["pattern"] >= 0.97 and named["outline"] >= 0.97 and named["all_correct"] >= 0.9
    flip = {"striped": "dotted", "dotted": "striped", "solid": "checkered", "checkered": "solid"}
    wrong = [" ".join(flip.get(w, w) for w in scene_prompt(s, details=True).split()) for s in scenes]
    bad = evaluator.score(images, wrong)
    assert bad["pattern"] <= 0.03 and bad["outline"] == named["outline"] and bad["all_correct"] <= 0.03


def test_prompts_without_positions_match_the_best_object(evaluator):
    image, _ = render(Scene((Obj("star", "red", "large", "left"), Obj("circle", "blue", "small", "bottom"))))
    assert evaluator.score([image], ["a blue circle and a red star"])["all_correct"] == 1.0
    assert evaluator.score([image], ["a red star"])["count"] == 0.0  # two objects where one was asked for


def test_embedding_is_normalised_and_separates_scenes(evaluator):
    a, _ = render(Scene((Obj("star", "red", "large", "left"),)))
    b, _ = render(Scene((Obj("star", "red", "large", "left", pattern="dotted"),)))
    c, _ = render(Scene((Obj("square", "blue", "small", "top"),), "black"))
    e = evaluator.embed([a, a, b, c])
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    sim = e @ e.T
    assert sim[0, 1] > 0.999 and sim[0, 2] < sim[0, 1] and sim[0, 3] < sim[0, 2]


def test_input_checks(evaluator):
    with pytest.raises(ValueError, match="RGB images"):
        evaluator.read(torch.zeros(2, 1, 64, 64))
    image, _ = render(sample_scene(random.Random(0)))
    with pytest.raises(ValueError, match="1 images for 2 prompts"):
        evaluator.score([image], ["a red circle", "a blue star"])
    # Other sizes are resized to 64x64 first (a large object: a small one's shape may not survive resampling).
    image, _ = render(Scene((Obj("square", "blue", "large", "left"),), "white"))
    big = image.resize((128, 128))
    resized, original = evaluator.read([big])[0], evaluator.read(np.asarray(image)[None])[0]
    assert (resized.objects, resized.background) == (original.objects, original.background)


def test_empty_scenes_hold_no_object_and_readings_say_how_sure(evaluator, renders):
    from PIL import Image

    blank = [Image.new("RGB", (64, 64), color) for color in ("white", "black", (240, 240, 240), (24, 24, 24))]
    for reading in evaluator.read(blank):
        assert reading.objects == {}
    assert evaluator.score(blank[:2], ["a red star", "a green star"])["all_correct"] == 0.0
    images, _ = renders
    assert min(r.confidence for r in evaluator.read(images)) > 0.9
    noise = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    assert np.mean([r.confidence for r in evaluator.read(noise)]) < 0.95
