"""Query strings: parsing into a multi-dict and building them back."""

from .encoding import quote_plus, unquote_plus


class MultiDict:
    """An ordered mapping in which a key may have several values."""

    def __init__(self, pairs=()):
        self._pairs = [(k, v) for k, v in pairs]

    def add(self, key, value):
        self._pairs.append((key, value))

    def getall(self, key):
        """All values for ``key``, in order (an empty list if none)."""
        return [v for k, v in self._pairs if k == key]

    def get(self, key, default=None):
        """The first value for ``key``, or ``default``."""
        values = self.getall(key)
        return values[0] if values else default

    def __getitem__(self, key):
        values = self.getall(key)
        if not values:
            raise KeyError(key)
        return values[0]

    def __contains__(self, key):
        return any(k == key for k, _ in self._pairs)

    def keys(self):
        """Distinct keys in order of first appearance."""
        return list(dict.fromkeys(k for k, _ in self._pairs))

    def items(self):
        return list(self._pairs)


def parse_qs(query, keep_blank=True):
    """Parse ``"a=1&b=2&a=3"`` into a :class:`MultiDict`.

    A leading ``?`` is ignored, ``+`` means a space and a name without ``=``
    gets the value ``""``; ``keep_blank=False`` drops empty values.
    """
    result = MultiDict()
    for chunk in query.removeprefix("?").split("&"):
        name, _, value = chunk.partition("=")
        if chunk and (value or keep_blank):
            result.add(unquote_plus(name), unquote_plus(value))
    return result


def build_qs(pairs):
    """Build a query string from a MultiDict, a dict (list values repeat the
    key) or an iterable of ``(name, value)`` pairs."""
    if isinstance(pairs, MultiDict):
        pairs = pairs.items()
    elif isinstance(pairs, dict):
        pairs = [(k, v) for k, vs in pairs.items()
                 for v in (vs if isinstance(vs, (list, tuple)) else [vs])]
    return "&".join(f"{quote_plus(str(k))}={quote_plus(str(v))}" for k, v in pairs)
