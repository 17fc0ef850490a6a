import os
import random

import numpy as np
import pytest

from genreg.tinyworld import HELD_OUT, Obj, Scene, caption, parse_prompt, render, sample_scene, scene_prompt
from genreg.tinyworld.world import vocabulary


def test_render_is_deterministic_and_masks_cover_objects():
    scene = Scene((Obj("star", "red", "large", "left", "striped", "outlined"), Obj("circle", "blue", "small", "top")))
    a, masks = render(scene)
    b, _ = render(scene)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert masks.shape == (2, 64, 64) and masks.dtype == bool
    assert masks[0].sum() > masks[1].sum() > 0  # large before small
    assert not (masks[0] & masks[1]).any()
    # The left object's mask lies in the left half, the top object's in the top half.
    assert np.nonzero(masks[0])[1].max() < 32 and np.nonzero(masks[1])[0].max() < 32


def test_sample_scene_is_seeded_and_holds_out_values():
    assert sample_scene(random.Random(3)) == sample_scene(random.Random(3))
    rng = random.Random(0)
    seen = {name: set() for name in HELD_OUT}
    for _ in range(2000):
        for obj in sample_scene(rng, holdout=True).objects:
            for name in HELD_OUT:
                seen[name].add(getattr(obj, name))
    for name, values in HELD_OUT.items():
        assert not seen[name] & set(values), f"held-out {name} sampled"
    full = {o.shape for _ in range(500) for o in sample_scene(rng, holdout=False).objects}
    assert "moon" in full


def test_pattern_and_outline_change_pixels_and_reach_captions_only_when_asked():
    base = Obj("square", "green", "large", "center")
    plain, _ = render(Scene((base,)))
    for variant in (
        Obj("square", "green", "large", "center", pattern="dotted"),
        Obj("square", "green", "large", "center", outline="outlined"),
    ):
        img, _ = render(Scene((variant,)))
        assert not np.array_equal(np.asarray(img), np.asarray(plain))
    rng = random.Random(1)
    for _ in range(300):
        text = caption(sample_scene(rng), rng)
        assert not any(w in text.split() for w in ("striped", "dotted", "checkered", "outlined", "solid", "plain"))
    named = [caption(sample_scene(rng), rng, detail_p=0.5) for _ in range(400)]
    share = np.mean([any(w in t.split() for w in ("striped", "dotted", "solid")) for t in named])
    assert 0.4 < share < 0.9  # one or two objects, each named with probability 0.5
    assert not any("checkered" in t for t in named)  # held out: never seen, never named
    with pytest.raises(ValueError, match="detail_p"):
        caption(sample_scene(rng), rng, detail_p=1.5)


def test_captions_without_details_are_the_first_models_captions():
    """detail_p=0 draws nothing extra, so a seed gives the captions the first bundled model was trained on."""
    rng = random.Random(4)
    assert [caption(sample_scene(random.Random(k)), rng) for k in range(3)] == [
        "a small blue diamond on the left and a large orange triangle at the bottom",
        "a blue circle in the middle",
        "a small circle on the left",
    ]


def test_captions_parse_back_to_the_scene():
    rng = random.Random(2)
    for k in range(300):
        scene = sample_scene(rng)
        spec = parse_prompt(caption(scene, rng, detail_p=0.5 * (k % 2)))
        assert len(spec.objects) == len(scene.objects)
        by_shape_and_pos = {(o.shape, o.position): o for o in scene.objects}
        for want in spec.objects:
            matches = [
                o
                for (shape, pos), o in by_shape_and_pos.items()
                if shape == want["shape"] and want.get("position", pos) == pos
            ]
            assert matches and all(getattr(matches[0], k) == v for k, v in want.items())


def test_parse_prompt_reads_typed_phrasings():
    spec = parse_prompt("A small blue square at the top and an orange star in the middle, black background")
    assert spec.background == "black"
    assert spec.objects == [
        {"shape": "square", "color": "blue", "size": "small", "position": "top"},
        {"shape": "star", "color": "orange", "position": "center"},
    ]
    assert parse_prompt(scene_prompt(sample_scene(random.Random(0), 1))).objects[0].keys() == {
        "shape",
        "color",
        "size",
        "position",
    }
    detailed = parse_prompt("a large plain striped red circle on the left and an outlined solid blue star")
    assert detailed.objects == [
        {
            "shape": "circle",
            "color": "red",
            "size": "large",
            "pattern": "striped",
            "outline": "none",
            "position": "left",
        },
        {"shape": "star", "color": "blue", "pattern": "solid", "outline": "outlined"},
    ]
    scene = Scene((Obj("moon", "cyan", "small", "top", "checkered", "outlined"),))
    assert parse_prompt(scene_prompt(scene, details=True)).objects[0] == {
        "shape": "moon",
        "color": "cyan",
        "size": "small",
        "pattern": "checkered",
        "outline": "outlined",
        "position": "top",
    }
    with pytest.raises(ValueError, match="names no tiny-world shape"):
        parse_prompt("a cat on a sofa")


def test_invalid_scenes_are_refused():
    with pytest.raises(ValueError, match="unknown shape"):
        Obj("hexagon", "red", "small", "left")
    with pytest.raises(ValueError, match="share the position"):
        Scene((Obj("circle", "red", "small", "left"), Obj("star", "blue", "small", "left")))
    with pytest.raises(ValueError, match="not the center"):
        Scene((Obj("circle", "red", "small", "center"), Obj("star", "blue", "small", "left")))
    with pytest.raises(ValueError, match="unknown background"):
        Scene((Obj("circle", "red", "small", "left"),), "plaid")


def test_scene_dict_round_trip():
    scene = sample_scene(random.Random(5), 2)
    assert Scene.from_dict(scene.to_dict()) == scene


def test_tokenizer_makes_world_words_single_tokens_and_accepts_new_ones(tmp_path):
    from transformers import CLIPTokenizer

    from genreg.tinyworld.architecture import build_tokenizer

    tok = build_tokenizer()
    for word in vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert tok.add_tokens(["<my-shape>"]) == 1
    ids = tok("a <my-shape> on the left").input_ids
    assert len(tok) - 1 in ids
    tok.save_pretrained(tmp_path)
    assert CLIPTokenizer.from_pretrained(tmp_path)("a <my-shape> on the left").input_ids == ids


def test_tokenizer_build_is_deterministic_across_processes():
    """Token ids must not depend on the process (hash seeds): the bundled text encoder is indexed by them."""
    import subprocess
    import sys

    code = (
        "from genreg.tinyworld.architecture import build_tokenizer; t = build_tokenizer(); "
        "print(sorted(t.get_vocab().items(), key=lambda kv: kv[1])[-40:])"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
        for env in ({**os.environ, "PYTHONHASHSEED": "1"}, {**os.environ, "PYTHONHASHSEED": "2"})
    ]
    assert runs[0] == runs[1]


def test_bundled_tokenizer_is_the_one_build_tokenizer_makes():
    from transformers import CLIPTokenizer

    from genreg.tinyworld import model_path
    from genreg.tinyworld.architecture import build_tokenizer

    bundled, built = (
        CLIPTokenizer.from_pretrained(model_path() / "tokenizer").get_vocab(),
        build_tokenizer().get_vocab(),
    )
    # Words added to the world since the bundled model was trained are appended: every id it knows is unchanged.
    assert {k: built[k] for k in bundled} == bundled
    assert min((i for k, i in built.items() if k not in bundled), default=len(bundled)) >= len(bundled)


def test_tokenizer_padded_to_a_vocabulary_size_keeps_every_id():
    from genreg.tinyworld.architecture import build_tokenizer

    plain, padded = build_tokenizer(77), build_tokenizer(77, vocab_size=1000)
    assert len(plain) < 1000 == len(padded)
    prompt = "a small blue square at the top, black background"
    assert padded(prompt).input_ids == plain(prompt).input_ids
    with pytest.raises(ValueError, match="vocab_size 10 is below"):
        build_tokenizer(vocab_size=10)


def test_caption_background_share_is_checked_and_zero_means_never():
    rng = random.Random(0)
    assert not any("background" in caption(sample_scene(rng), rng, background_p=0.0) for _ in range(50))
    with pytest.raises(ValueError, match="between 0 and 1"):
        caption(sample_scene(rng), rng, background_p=1.5)
