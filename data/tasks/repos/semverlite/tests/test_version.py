import pytest

from semverlite.version import Version, compare, parse


def test_parse_full_version():
    v = parse("1.2.3-rc.1+build.5")
    assert (v.major, v.minor, v.patch) == (1, 2, 3)
    assert v.prerelease == ("rc", "1")
    assert v.build == ("build", "5")
    assert str(v) == "1.2.3-rc.1+build.5"


def test_parse_rejects_invalid():
    for bad in ["1.2", "01.2.3", "1.2.3-", "1.2.3-01", "a.b.c", "1.2.3.4"]:
        with pytest.raises(ValueError):
            parse(bad)


def test_prerelease_precedence():
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta",
               "1.0.0-beta.2", "1.0.0-rc.1", "1.0.0"]
    shuffled = [ordered[i] for i in (3, 6, 0, 5, 2, 4, 1)]
    assert [str(v) for v in sorted(map(parse, shuffled))] == ordered


def test_build_metadata_ignored_for_precedence():
    assert parse("1.2.3+a") == parse("1.2.3+b")
    assert hash(parse("1.2.3+a")) == hash(parse("1.2.3"))


def test_compare():
    assert compare("1.2.3", "1.2.4") == -1
    assert compare("2.0.0", Version(1, 9, 9)) == 1
    assert compare("1.0.0+x", "1.0.0") == 0
