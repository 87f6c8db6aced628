"""Version ranges such as ``">=1.2.0,<2.0.0"``, ``"^1.2.3"`` and ``"~1.2"``."""
import operator
import re

from .version import Version

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
        "==": operator.eq, "=": operator.eq, "!=": operator.ne}
_COMPARATOR_RE = re.compile(r"(>=|<=|==|!=|>|<|=|\^|~)?(.+)")
_PARTIAL_RE = re.compile(r"v?(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def _parse_partial(text):
    """Parse "1", "v1.2", "1.2.3-rc.1", ...: (version with missing parts 0, parts given)."""
    m = _PARTIAL_RE.fullmatch(text)
    if m:
        nums = [int(g) for g in m.groups() if g is not None]
        return Version(*nums), len(nums)
    return Version.parse(text), 3


def _caret(v, given):
    """^X.Y.Z allows changes that do not modify the left-most non-zero part."""
    if v.major > 0 or given == 1:
        upper = Version(v.major + 1, 0, 0)
    elif v.minor > 0 or given == 2:
        upper = Version(0, v.minor + 1, 0)
    else:
        upper = Version(0, 0, v.patch + 1)
    return [(operator.ge, v), (operator.lt, upper)]


def _tilde(v, given):
    """~X.Y.Z and ~X.Y allow patch-level changes; ~X allows minor-level changes."""
    if given == 1:
        upper = Version(v.major + 1, 0, 0)
    else:
        upper = Version(v.major, v.minor + 1, 0)
    return [(operator.ge, v), (operator.lt, upper)]


def _parse_comparator(token):
    op, text = _COMPARATOR_RE.fullmatch(token).groups()
    if op == "^":
        return _caret(*_parse_partial(text))
    if op == "~":
        return _tilde(*_parse_partial(text))
    return [(_OPS[op or "="], Version.parse(text))]


class Range:
    """A set of comparators that must all hold (comma or space separated)."""

    def __init__(self, spec):
        self.spec = spec
        normalized = re.sub(r"(>=|<=|==|!=|>|<|=|\^|~)\s+", r"\1", spec.strip())
        tokens = [t for t in re.split(r"[,\s]+", normalized) if t]
        if not tokens:
            raise ValueError(f"empty version range: {spec!r}")
        self.comparators = [c for t in tokens for c in _parse_comparator(t)]

    def matches(self, version, include_prerelease=False):
        """True if *version* satisfies every comparator.

        Unless *include_prerelease* is set, a pre-release only matches when some
        comparator names a pre-release of the same major.minor.patch.
        """
        v = version if isinstance(version, Version) else Version.parse(version)
        if v.prerelease and not include_prerelease:
            core = (v.major, v.minor, v.patch)
            if not any(b.prerelease and (b.major, b.minor, b.patch) == core
                       for _, b in self.comparators):
                return False
        return all(op(v, bound) for op, bound in self.comparators)

    __contains__ = matches


def satisfies(version, spec, include_prerelease=False):
    """True if *version* lies in the range *spec*."""
    return Range(spec).matches(version, include_prerelease)


def max_satisfying(versions, spec):
    """The highest of *versions* that satisfies *spec*, or None."""
    rng = Range(spec)
    parsed = (v if isinstance(v, Version) else Version.parse(v) for v in versions)
    return max((v for v in parsed if rng.matches(v)), default=None)
