"""Incrementing versions. Bumped versions never keep build metadata."""
from .version import Version


def _coerce(v):
    return v if isinstance(v, Version) else Version.parse(v)


def bump_major(v):
    """``1.2.3`` -> ``2.0.0``."""
    v = _coerce(v)
    return Version(v.major + 1, 0, 0)


def bump_minor(v):
    """``1.2.3`` -> ``1.3.0``."""
    v = _coerce(v)
    return Version(v.major, v.minor + 1, 0)


def bump_patch(v):
    """``1.2.3`` -> ``1.2.4``; a pre-release is released: ``1.2.4-rc.1`` -> ``1.2.4``."""
    v = _coerce(v)
    if v.prerelease:
        return Version(v.major, v.minor, v.patch)
    return Version(v.major, v.minor, v.patch + 1)


def bump_prerelease(v, tag="rc"):
    """Next pre-release: ``1.2.4-rc.1`` -> ``1.2.4-rc.2``, ``1.2.3`` -> ``1.2.4-rc.1``.

    A pre-release whose last identifier is not numeric gets ``.1`` appended.
    """
    v = _coerce(v)
    if not v.prerelease:
        return Version(v.major, v.minor, v.patch + 1, (tag, "1"))
    parts = list(v.prerelease)
    if parts[-1].isdigit():
        parts[-1] = str(int(parts[-1]) + 1)
    else:
        parts.append("1")
    return Version(v.major, v.minor, v.patch, parts)


_BUMPERS = {"major": bump_major, "minor": bump_minor, "patch": bump_patch,
            "prerelease": bump_prerelease}


def bump(v, part):
    """Bump *part* ("major", "minor", "patch" or "prerelease") of version *v*."""
    if part not in _BUMPERS:
        raise ValueError(f"unknown version part: {part!r}")
    return _BUMPERS[part](v)
