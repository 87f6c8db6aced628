"""Percent-encoding (RFC 3986) of UTF-8 text."""

import string

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)


def quote(text, safe="/"):
    """Percent-encode every byte of ``text`` (UTF-8) except unreserved
    characters and those listed in ``safe``."""
    allowed = _UNRESERVED | frozenset(safe)
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        out.append(char if byte < 128 and char in allowed else "%%%02X" % byte)
    return "".join(out)


def unquote(text):
    """Decode ``%XX`` escapes; the resulting bytes are decoded as UTF-8.

    Malformed escapes such as ``"%zz"`` or a lone ``"%"`` are left as they are.
    """
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char == "%" and i + 2 < len(text) and set(text[i + 1:i + 3]) <= _HEX:
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            out.extend(char.encode("utf-8"))
            i += 1
    return out.decode("utf-8", errors="replace")


def quote_plus(text, safe=""):
    """Like :func:`quote` but encode spaces as ``+`` (HTML form encoding)."""
    return quote(text, safe + " ").replace(" ", "+")


def unquote_plus(text):
    """Like :func:`unquote` but decode ``+`` as a space."""
    return unquote(text.replace("+", " "))
