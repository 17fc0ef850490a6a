import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from genreg.tinyworld import HELD_OUT, Obj, Scene, render
from genreg.tinyworld.edits import (
    EDIT_KINDS,
    EditCase,
    edit_region,
    edit_success,
    make_edit,
    masked_psnr,
    preservation,
    sample_edits,
    scene_reading,
)
from genreg.tinyworld.world import DETAIL_WORDS

OBJECT_FIELDS = ("shape", "color", "size", "position", "pattern", "outline")


def changed_fields(case: EditCase) -> set[str]:
    changed = {"background"} if case.source.background != case.target.background else set()
    for a, b in zip(case.source.objects, case.target.objects, strict=True):
        changed |= {name for name in OBJECT_FIELDS if getattr(a, name) != getattr(b, name)}
    return changed


def test_cases_are_seeded_balanced_and_change_exactly_the_edited_attribute():
    cases = sample_edits(60, seed=3)
    assert cases == sample_edits(60, seed=3) and cases != sample_edits(60, seed=4)
    assert Counter(c.label for c in cases[:6]) == {f"{k}/{n}": 1 for k in EDIT_KINDS for n in (1, 2)}
    assert set(Counter(c.label for c in cases).values()) == {10}
    for case in cases:
        assert changed_fields(case) == {case.kind}
        assert case.source_prompt != case.target_prompt and case.value in case.target_prompt
        assert (case.index is None) == (case.kind == "background")
        for obj in case.source.objects + case.target.objects:
            for name, values in HELD_OUT.items():
                assert getattr(obj, name) not in values


def test_named_details_change_only_the_prompts():
    plain, named = sample_edits(12, seed=3), sample_edits(12, seed=3, details=True)
    assert [replace(c, details=True) for c in plain] == named
    for case in named:
        for prompt, scene in ((case.source_prompt, case.source), (case.target_prompt, case.target)):
            for obj in scene.objects:
                assert DETAIL_WORDS["pattern"][obj.pattern] in prompt
                assert DETAIL_WORDS["outline"][obj.outline] in prompt
    words = {w for names in DETAIL_WORDS.values() for w in names.values()}
    assert not any(w in c.source_prompt.split() for c in plain for w in words)


def test_make_edit_refuses_unknown_kinds_and_inconsistent_cases():
    scene = Scene((Obj("circle", "red", "large", "left"),))
    with pytest.raises(ValueError, match="unknown edit kind 'size'"):
        make_edit(scene, "size", random.Random(0))
    with pytest.raises(ValueError, match="names the edited object's index"):
        EditCase("color", scene, scene)
    case = make_edit(scene, "shape", random.Random(0))
    assert case.index == 0 and case.target.objects[0].shape != "circle"


def test_renders_differ_only_inside_the_edit_region():
    for case in sample_edits(60, seed=5):
        source, target = (np.asarray(render(s)[0]) for s in (case.source, case.target))
        region = edit_region(case)
        assert (source != target).any(axis=-1)[region].any()  # the edit shows
        assert np.array_equal(source[~region], target[~region])
        assert (~region).sum() >= 16  # something is left to preserve


def test_a_perfect_edit_succeeds_and_preserves_everything_and_no_edit_fails():
    for case in sample_edits(30, seed=6):
        assert edit_success(scene_reading(case.target), case)
        assert all(preservation(scene_reading(case.target), case).values())
        assert not edit_success(scene_reading(case.source), case)
        assert all(preservation(scene_reading(case.source), case).values())  # the source differs only in the edit


def test_preservation_names_what_changed():
    scene = Scene((Obj("circle", "red", "large", "left"), Obj("square", "blue", "small", "top", "striped")), "black")
    case = EditCase(
        "color", scene, replace(scene, objects=(replace(scene.objects[0], color="green"), scene.objects[1])), 0
    )
    reading = scene_reading(case.target)
    reading.objects["top"]["pattern"] = "dotted"
    reading.objects["left"]["size"] = "small"
    failed = {k for k, ok in preservation(reading, case).items() if not ok}
    assert failed == {"other object pattern", "edited object size"} and edit_success(reading, case)
    del reading.objects["top"]
    failed = {k for k, ok in preservation(reading, case).items() if not ok}
    assert {"count", "other object position", "other object shape"} <= failed
    reading.background = "white"
    assert not preservation(reading, case)["background"]


def test_masked_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    b = a.copy()
    b[2:] = 200  # outside the mask
    assert masked_psnr(b, a, mask) == float("inf")
    b[:2] = 1
    assert masked_psnr(b, a, mask) == pytest.approx(20 * np.log10(255))
    with pytest.raises(ValueError, match="selects no pixel"):
        masked_psnr(b, a, np.zeros((4, 4), bool))


def test_the_evaluator_scores_perfect_renders_of_the_target_as_perfect_edits(evaluator):
    cases = sample_edits(30, seed=7)
    targets = np.stack([np.asarray(render(c.target)[0]) for c in cases])
    sources = np.stack([np.asarray(render(c.source)[0]) for c in cases])
    for case, reading, target, source in zip(cases, evaluator.read(targets), targets, sources, strict=True):
        assert edit_success(reading, case), case
        assert all(preservation(reading, case).values()), case
        assert masked_psnr(target, source, ~edit_region(case)) == float("inf")
