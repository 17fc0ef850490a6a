"""Config dataclasses <-> command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from genreg.config import add_arguments, from_namespace, given, option


@dataclass
class Example:
    steps: int = option(10, "steps")
    rate: float = option(0.5, "rate")
    words: list[str] | None = option(None, "words")
    levels: tuple[int, ...] = option((1, 2), "levels")
    fast: bool = option(True, "fast")
    kind: str = option("a", "kind", choices=("a", "b"))


def test_flags_round_trip_with_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example)
    args = parser.parse_args(["--steps", "3", "--words", "x", "y", "--levels", "4", "--no-fast", "--kind", "b"])
    assert from_namespace(Example, args) == Example(3, 0.5, ["x", "y"], (4,), False, "b")
    assert from_namespace(Example, parser.parse_args([])) == Example()


def test_unset_flags_stay_none_so_presets_survive():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example, dashes=True, unset_is_none=True)
    args = parser.parse_args(["--rate", "2", "--levels", "0", "3"])
    assert given(Example, args) == {"rate": 2.0, "levels": (0, 3)}


def test_an_instance_round_trips_through_its_flags():
    from genreg.config import to_argv

    parser = argparse.ArgumentParser()
    add_arguments(parser, Example)
    for example in (Example(), Example(3, 0.25, ["x", "y"], (4,), False, "b")):
        assert from_namespace(Example, parser.parse_args(to_argv(example))) == example
