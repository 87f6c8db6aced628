import pytest

from semverlite.bump import bump, bump_major, bump_minor, bump_patch, bump_prerelease


def test_bump_major():
    assert str(bump_major("1.2.3")) == "2.0.0"


def test_bump_minor():
    assert str(bump_minor("1.2.0")) == "1.3.0"
    assert str(bump_minor("0.9.0-rc.1")) == "0.10.0"


def test_bump_patch():
    assert str(bump_patch("1.2.3")) == "1.2.4"
    assert str(bump_patch("1.2.4-rc.1")) == "1.2.4"
    assert str(bump_patch("1.2.3+build.7")) == "1.2.4"


def test_bump_prerelease():
    assert str(bump_prerelease("1.2.3")) == "1.2.4-rc.1"
    assert str(bump_prerelease("1.2.4-rc.1")) == "1.2.4-rc.2"
    assert str(bump_prerelease("1.0.0-beta")) == "1.0.0-beta.1"
    assert str(bump_prerelease("2.0.0", tag="alpha")) == "2.0.1-alpha.1"


def test_bump_dispatch():
    assert str(bump("1.2.3", "major")) == "2.0.0"
    with pytest.raises(ValueError):
        bump("1.2.3", "build")
