"""semverlite: parse, compare, bump and match semantic versions."""
from .version import Version, compare, parse
from .bump import bump, bump_major, bump_minor, bump_patch, bump_prerelease
from .ranges import Range, max_satisfying, satisfies

__all__ = [
    "Version", "compare", "parse",
    "bump", "bump_major", "bump_minor", "bump_patch", "bump_prerelease",
    "Range", "max_satisfying", "satisfies",
]
