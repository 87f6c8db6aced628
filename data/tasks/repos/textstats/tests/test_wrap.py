import pytest

from textstats.wrap import fill, wrap


def test_wrap_basic():
    text = "the quick brown fox jumps over the lazy dog"
    assert wrap(text, 10) == ["the quick", "brown fox", "jumps over", "the lazy", "dog"]


def test_wrap_long_first_word():
    assert wrap("abcdefghij xy", 4) == ["abcd", "efgh", "ij", "xy"]


def test_wrap_blank_and_invalid_width():
    assert wrap("  \n ", 5) == []
    with pytest.raises(ValueError):
        wrap("abc", 0)


def test_fill_with_indent():
    assert fill("one two three four", 10, indent="  ") == "  one two\n  three\n  four"
