"""Semantic versions (https://semver.org): parsing, formatting and precedence."""
import functools
import re

_IDENT = r"[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*"
_VERSION_RE = re.compile(
    r"v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-(" + _IDENT + r"))?(?:\+(" + _IDENT + r"))?"
)


def _prerelease_key(prerelease):
    """Sort key for pre-release identifiers.

    A release (no identifiers) sorts after any pre-release. Numeric identifiers
    compare numerically and sort before alphanumeric ones, which compare in
    ASCII order; a shorter list sorts first when it is a prefix of a longer one.
    """
    if not prerelease:
        return (1, ())
    parts = []
    for ident in prerelease:
        if ident.isdigit():
            parts.append((0, int(ident), ""))
        else:
            parts.append((1, 0, ident))
    return (0, tuple(parts))


@functools.total_ordering
class Version:
    """An immutable-by-convention semantic version."""

    __slots__ = ("major", "minor", "patch", "prerelease", "build")

    def __init__(self, major, minor=0, patch=0, prerelease=(), build=()):
        if min(major, minor, patch) < 0:
            raise ValueError("version numbers must be non-negative")
        self.major, self.minor, self.patch = int(major), int(minor), int(patch)
        self.prerelease = tuple(str(p) for p in prerelease)
        self.build = tuple(str(b) for b in build)

    @classmethod
    def parse(cls, text):
        """Parse ``"1.2.3"``, ``"1.2.3-rc.1+build.5"`` and the like; a leading "v" is allowed."""
        m = _VERSION_RE.fullmatch(text.strip())
        if not m:
            raise ValueError(f"invalid version: {text!r}")
        major, minor, patch, pre, build = m.groups()
        pre = tuple(pre.split(".")) if pre else ()
        for ident in pre:
            if ident.isdigit() and len(ident) > 1 and ident[0] == "0":
                raise ValueError(f"leading zero in pre-release identifier: {text!r}")
        build = tuple(build.split(".")) if build else ()
        return cls(int(major), int(minor), int(patch), pre, build)

    def _key(self):
        # Build metadata does not take part in precedence.
        return (self.major, self.minor, self.patch, _prerelease_key(self.prerelease))

    def __eq__(self, other):
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __lt__(self, other):
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __hash__(self):
        return hash(self._key())

    def __str__(self):
        s = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            s += "-" + ".".join(self.prerelease)
        if self.build:
            s += "+" + ".".join(self.build)
        return s

    def __repr__(self):
        return f"Version('{self}')"


def parse(text):
    """Parse *text* into a :class:`Version` (``Version.parse`` shortcut)."""
    return Version.parse(text)


def compare(a, b):
    """Return -1, 0 or 1 as *a* is lower than, equal to or higher than *b* (str or Version)."""
    a = a if isinstance(a, Version) else Version.parse(a)
    b = b if isinstance(b, Version) else Version.parse(b)
    return (a > b) - (a < b)
