from semverlite.ranges import Range, max_satisfying, satisfies
from semverlite.version import Version


def test_comparator_set():
    assert satisfies("1.5.0", ">=1.2.0,<2.0.0")
    assert not satisfies("2.0.0", ">=1.2.0,<2.0.0")
    assert not satisfies("1.1.9", ">=1.2.0,<2.0.0")
    assert satisfies("1.2.0", ">= 1.2.0 < 2.0.0")


def test_exact_and_not_equal():
    assert satisfies("1.2.3", "=1.2.3")
    assert satisfies("1.2.3", "1.2.3")
    assert satisfies("1.2.4", "!=1.2.3")
    assert not satisfies("1.2.3", "!=1.2.3")


def test_less_or_equal():
    assert satisfies("1.0.0", "<=2.0.0")
    assert not satisfies("3.0.0", "<=2.0.0")


def test_caret():
    assert satisfies("1.2.3", "^1.2.3")
    assert satisfies("1.9.9", "^1.2.3")
    assert not satisfies("2.0.0", "^1.2.3")
    assert not satisfies("1.2.2", "^1.2.3")


def test_tilde():
    assert satisfies("1.2.9", "~1.2.3")
    assert not satisfies("1.3.0", "~1.2.3")
    assert satisfies("1.2.0", "~1.2") and not satisfies("1.3.0", "~1.2")
    assert satisfies("1.9.0", "~1") and not satisfies("2.0.0", "~1")
    assert "1.3.5" in Range("~1.3")


def test_prereleases_need_opt_in():
    assert not satisfies("2.0.0-rc.1", ">=1.0.0")
    assert satisfies("2.0.0-rc.1", ">=1.0.0", include_prerelease=True)
    assert satisfies("1.2.3-rc.2", ">=1.2.3-rc.1,<2.0.0")


def test_max_satisfying():
    versions = ["1.2.3", "1.4.0", "2.0.0", "1.4.0-rc.1"]
    assert max_satisfying(versions, "^1.2") == Version(1, 4, 0)
    assert max_satisfying(versions, ">=3.0.0") is None
