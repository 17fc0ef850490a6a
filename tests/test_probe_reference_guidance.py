"""probe_reference_guidance's --variants: NAME='{json}' with ReferenceGuidance's fields, refused by name otherwise."""

import argparse
import sys

import pytest

sys.path.insert(0, "scripts")
from probe_reference_guidance import variant  # noqa: E402


def test_a_variant_is_a_name_and_reference_guidance_fields():
    assert variant('lr01={"learning_rate": 0.1}') == ("lr01", {"learning_rate": 0.1})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('fast={"speed": 2}', "ReferenceGuidance's fields"),
        ("fast={learning_rate: 0.1}", "ReferenceGuidance's fields"),
        ('={"learning_rate": 0.1}', "a NAME of its own"),
        ('full={"learning_rate": 0.1}', "a NAME of its own"),
        ("fast", "ReferenceGuidance's fields"),
    ],
)
def test_a_bad_variant_is_refused_with_the_form_it_takes(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        variant(text)
