"""bench_tinyworld's colour reading per asked colour and size, over the objects of one- and two-object scenes."""

import sys
from types import SimpleNamespace

from genreg.tinyworld.evaluator import Reading
from genreg.tinyworld.world import Obj, Scene


def test_colour_by_size_reads_every_object_and_counts_binding_errors():
    sys.path.insert(0, "scripts")
    from bench_tinyworld import colour_by_size, colour_table

    scenes = [
        Scene((Obj("circle", "orange", "small", "left"),)),
        Scene((Obj("circle", "orange", "small", "left"), Obj("star", "red", "large", "right"))),
        Scene((Obj("square", "orange", "small", "top"), Obj("star", "blue", "small", "bottom"))),
    ]
    readings = [
        Reading({"left": {"color": "orange"}}, "white"),
        Reading({"left": {"color": "red"}, "right": {"color": "red"}}, "white"),  # took the other's colour
        Reading({"top": {"color": "yellow"}}, "white"),  # yellow: a plain error; the blue square not drawn at all
    ]
    evaluator = SimpleNamespace(read=lambda images: readings)
    table = colour_by_size(evaluator, [None] * 3, scenes)
    assert table["orange"]["small"] == {"accuracy": 1 / 3, "n": 3, "wrong": {"red": 1, "yellow": 1}, "other": 1}
    assert table["red"]["large"]["accuracy"] == 1.0
    assert table["blue"]["small"] == {"accuracy": 0.0, "n": 1, "wrong": {"none": 1}, "other": 0}
    rows = colour_table(table)
    assert rows[2].startswith("| red | - | 1.000 (1)")
    assert "0.333 (3) red 1, yellow 1 (1 the other object's)" in rows[-1]
