"""Device selectors: exact values, version ranges in interval notation, comparisons."""
from __future__ import annotations

import pytest

from services.coordinator.selectors import parse, version_key
from shared.errors import InvalidArgument


@pytest.mark.parametrize("smaller, larger", [("13", "14"), ("13.1", "13.10"), ("9", "10"), ("1.17.3", "1.18"),
                                             ("1.2.9", "1.2.beta"), ("2", "2.0.1")])
def test_versions_order_numerically_part_by_part(smaller, larger):
    assert version_key(smaller) < version_key(larger)


def test_trailing_zeros_do_not_matter():
    assert version_key("14") == version_key("14.0") == version_key("14.0.0")


@pytest.mark.parametrize("condition, inside, outside", [
    ("[13,15)", ["13", "14", "14.9.9"], ["12.9", "15", "15.0", "16"]),
    ("(13,15]", ["13.0.1", "15"], ["13", "15.1"]),
    ("[1.18,)", ["1.18", "1.23.2", "2"], ["1.17.9"]),
    ("(,14)", ["13", "1"], ["14", "14.1"]),
    ("[2.0,2.0]", ["2", "2.0"], ["2.0.1", "1.9"]),
    (">=8000000000", ["8000000000", "16000000000"], ["7999999999"]),
    ("<15", ["14.9"], ["15"]),
    ("!=x86_64", ["arm64"], ["x86_64"]),
    ("==14", ["14.0"], ["14.1"]),
    ("pixel-8", ["pixel-8"], ["pixel-8-pro", "Pixel-8"]),
])
def test_conditions(condition, inside, outside):
    selector = parse({"v": condition})
    assert all(selector.matches({"v": value}) for value in inside)
    assert not any(selector.matches({"v": value}) for value in outside)


def test_every_key_must_match_and_missing_attributes_never_do():
    selector = parse({"os": "android", "os_version": "[13,15)"})
    assert selector.matches({"os": "android", "os_version": "14", "extra": "x"})
    assert not selector.matches({"os": "android"})
    assert not selector.matches({"os": "linux", "os_version": "14"})
    assert selector.describe() == "os: android, os_version: [13,15)"


@pytest.mark.parametrize("condition, words", [("[15,13)", "is empty: 15 is above 13"), ("[,)", "neither"),
                                              ("[13;15)", "not a version range"), ("", "is empty")])
def test_malformed_conditions_name_the_field(condition, words):
    with pytest.raises(InvalidArgument) as error:
        parse({"os_version": condition}, "targets[0].selector")
    assert error.value.field == "targets[0].selector.os_version" and words in error.value.message
