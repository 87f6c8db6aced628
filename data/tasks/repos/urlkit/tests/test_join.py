import pytest

from urlkit import join, remove_dot_segments

BASE = "http://a/b/c/d;p?q"


@pytest.mark.parametrize("ref, expected", [
    ("g:h", "g:h"),
    ("g", "http://a/b/c/g"),
    ("./g", "http://a/b/c/g"),
    ("g/", "http://a/b/c/g/"),
    ("/g", "http://a/g"),
    ("//g", "http://g"),
    ("?y", "http://a/b/c/d;p?y"),
    ("g?y", "http://a/b/c/g?y"),
    ("#s", "http://a/b/c/d;p?q#s"),
    (";x", "http://a/b/c/;x"),
    ("", "http://a/b/c/d;p?q"),
    ("../g", "http://a/b/g"),
    ("../../g", "http://a/g"),
    ("../../../g", "http://a/g"),
    ("/./g", "http://a/g"),
    ("g/../h", "http://a/b/c/h"),
    ("g;x=1/../y", "http://a/b/c/y"),
    ("g?y/../x", "http://a/b/c/g?y/../x"),
])
def test_join_rfc3986_examples(ref, expected):
    assert join(BASE, ref) == expected


def test_remove_dot_segments():
    assert remove_dot_segments("/a/b/c/./../../g") == "/a/g"
    assert remove_dot_segments("mid/content=5/../6") == "mid/6"
    assert remove_dot_segments("/a/b/") == "/a/b/"
    assert remove_dot_segments("") == ""


def test_join_keeps_authority():
    assert join("http://u@h:8080/a/b", "c") == "http://u@h:8080/a/c"
    assert join("https://h/a", "//other.example/x") == "https://other.example/x"
    assert join("http://h", "x") == "http://h/x"
