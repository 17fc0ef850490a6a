"""Subject kits: reference renders, new contexts, and the identity / alignment metrics read by the evaluator."""

from __future__ import annotations

import dataclasses
import json

import pytest

from genreg.tinyworld import Scene, parse_prompt, render
from genreg.tinyworld.subjects import (
    SUBJECTS,
    evaluation_cases,
    reference_scenes,
    replacement_cases,
    replacement_checks,
    score_subject,
    write_kit,
)

SUBJECT = SUBJECTS["striped-orange-star"]


def test_kit_has_varied_references_with_placeholder_captions(tmp_path):
    write_kit(SUBJECT, tmp_path, k=4)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all((tmp_path / r["file_name"]).is_file() and "{}" in r["text"] for r in rows)
    layouts = {(s.objects[0].position, s.objects[0].size) for s in reference_scenes(SUBJECT)}
    assert len(layouts) == 4 and "center" not in {p for p, _ in layouts}
    with pytest.raises(ValueError, match="at least one reference"):
        reference_scenes(SUBJECT, k=0)


def test_cases_are_new_contexts_and_say_what_they_ask():
    cases = evaluation_cases(SUBJECT)
    assert len(cases) == 8
    for case in cases:
        spec = parse_prompt(case.prompt(SUBJECT.words))
        assert [o["position"] for o in spec.objects] == [o.position for o in case.scene.objects]
        assert spec.background in (None, case.scene.background)
        companion = case.scene.objects[1:]
        assert all(o.shape != SUBJECT.shape and o.color != SUBJECT.color for o in companion)


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_the_full_description_names_every_identity_attribute_and_the_words_only_two(name):
    subject = SUBJECTS[name]
    (described,) = parse_prompt(f"a {subject.description} on the left").objects
    (worded,) = parse_prompt(f"a {subject.words} on the left").objects
    identity = {"shape": subject.shape, "color": subject.color, "pattern": subject.pattern, "outline": subject.outline}
    assert {k: described[k] for k in identity} == identity
    assert {k: worded.get(k) for k in identity} == {**identity, "pattern": None, "outline": None}


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_perfect_renders_score_full_identity_and_alignment(evaluator, name):
    subject = SUBJECTS[name]
    cases = evaluation_cases(subject)
    references = [render(s)[0] for s in reference_scenes(subject)]
    scores = score_subject(evaluator, [render(c.scene)[0] for c in cases], cases, subject, references)
    assert scores["identity"] == 1.0 and scores["alignment"] == 1.0


def test_a_different_pattern_breaks_identity_but_not_alignment(evaluator):
    cases = evaluation_cases(SUBJECT)
    references = [render(s)[0] for s in reference_scenes(SUBJECT)]

    def dotted(scene: Scene) -> Scene:
        first = dataclasses.replace(scene.objects[0], pattern="dotted")
        return dataclasses.replace(scene, objects=(first, *scene.objects[1:]))

    images = [render(dotted(c.scene))[0] for c in cases]
    scores = score_subject(evaluator, images, cases, SUBJECT, references)
    assert scores["identity"] == 0.0 and scores["pattern"] == 0.0 and scores["alignment"] == 1.0


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_replacement_cases_swap_one_word_and_perfect_renders_score_as_they_should(evaluator, name):
    """The target render reads as the subject at the object's place with the rest kept; the source render keeps the
    rest but shows the old object, never the subject."""
    subject = SUBJECTS[name]
    cases = replacement_cases(subject, 6)
    assert {len(c.source.objects) for c in cases} == {1, 2}
    for case in cases:
        old = case.source.objects[case.index]
        assert old.shape != subject.shape and old.color != subject.color
        source, target = case.prompt(), case.prompt(subject.shape)
        assert source.replace(f" {old.shape} ", f" {subject.shape} ", 1) == target and old.color not in source
    readings = evaluator.read([render(c.target(subject))[0] for c in cases] + [render(c.source)[0] for c in cases])
    checks = [replacement_checks(r, c, subject) for r, c in zip(readings, cases * 2, strict=True)]
    assert all(c == {"identity": True, "kept": True} for c in checks[: len(cases)])
    assert all(c == {"identity": False, "kept": True} for c in checks[len(cases) :])


def test_a_recoloured_other_object_is_not_kept(evaluator):
    case = next(c for c in replacement_cases(SUBJECT, 4) if len(c.source.objects) == 2)
    target = case.target(SUBJECT)
    other = 1 - case.index
    objects = list(target.objects)
    objects[other] = dataclasses.replace(objects[other], color="red" if objects[other].color != "red" else "blue")
    (reading,) = evaluator.read([render(dataclasses.replace(target, objects=tuple(objects)))[0]])
    assert replacement_checks(reading, case, SUBJECT) == {"identity": True, "kept": False}
