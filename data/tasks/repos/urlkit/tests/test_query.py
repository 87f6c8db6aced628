import pytest

from urlkit import MultiDict, build_qs, parse_qs


def test_parse_qs_multiple_values():
    md = parse_qs("?a=1&b=2&a=3")
    assert md.getall("a") == ["1", "3"]
    assert md.get("b") == "2"
    assert md["a"] == "1"
    assert md.keys() == ["a", "b"]
    assert "c" not in md
    assert md.get("c", "x") == "x"
    with pytest.raises(KeyError):
        md["c"]


def test_parse_qs_decoding_and_blanks():
    md = parse_qs("q=hello+world&flag&&empty=&name=J%C3%BCrgen&x=1")
    assert md.items() == [("q", "hello world"), ("flag", ""), ("empty", ""),
                          ("name", "Jürgen"), ("x", "1")]
    assert parse_qs("q=hello+world&flag&empty=&x=1", keep_blank=False).keys() == ["q", "x"]


def test_build_qs():
    assert build_qs([("q", "hello world"), ("tag", "a&b")]) == "q=hello+world&tag=a%26b"
    assert build_qs({"a": ["1", "2"], "b": 3}) == "a=1&a=2&b=3"
    md = MultiDict([("k", "v w"), ("k", "x/y"), ("z", "é1")])
    assert build_qs(md) == "k=v+w&k=x%2Fy&z=%C3%A91"
    assert parse_qs(build_qs(md)).items() == md.items()
