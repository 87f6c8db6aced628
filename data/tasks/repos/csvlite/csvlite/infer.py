"""Guessing and applying column types."""

_BOOLS = {"true": True, "false": False}


def infer_value(text):
    """Convert one field to ``None``, ``bool``, ``int``, ``float`` or leave it a ``str``.

    Blank fields become None; ``true``/``false`` (any case) become booleans.
    """
    s = text.strip()
    if not s:
        return None
    if s.lower() in _BOOLS:
        return _BOOLS[s.lower()]
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return text


def infer_column(values):
    """Return the narrowest of ``bool``, ``int``, ``float``, ``str`` that fits all values.

    Blank values are ignored; a column with no non-blank values is ``str``.
    Integers and floats mixed give ``float``.
    """
    kinds = set()
    for value in values:
        if not value.strip():
            continue
        kinds.add(type(infer_value(value)))
    if kinds == {bool}:
        return bool
    if kinds and kinds <= {int}:
        return int
    if kinds and kinds <= {int, float}:
        return float
    return str


def convert(text, kind):
    """Convert ``text`` to ``kind``; blank text becomes None unless ``kind`` is str."""
    if kind is str:
        return text
    s = text.strip()
    if not s:
        return None
    if kind is bool:
        return _BOOLS[s.lower()]
    return kind(s)
