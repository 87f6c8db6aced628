"""Splitting URLs into their components and putting them back together."""

import re
from collections import namedtuple

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")

# Absent parts are None ("" for scheme and path).
SplitURL = namedtuple("SplitURL", "scheme userinfo host port path query fragment")


def _parse_port(text):
    if not text.isdigit():
        raise ValueError(f"invalid port: {text!r}")
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    return port


def _split_authority(authority):
    userinfo = None
    if "@" in authority:
        userinfo, authority = authority.rsplit("@", 1)
    host, port = authority, None
    colon = authority.rfind(":")
    if colon > authority.rfind("]"):  # not inside an IPv6 literal such as [::1]
        host, port_text = authority[:colon], authority[colon + 1:]
        port = _parse_port(port_text) if port_text else None
    return userinfo, host.lower(), port


def split_url(url):
    """Split ``url`` into a :class:`SplitURL`.

    The scheme and host are lower-cased; the port is an ``int`` or ``None``.
    """
    url = url.strip()
    fragment = query = None
    if "#" in url:
        url, fragment = url.split("#", 1)
    if "?" in url:
        url, query = url.split("?", 1)
    scheme = ""
    match = _SCHEME_RE.match(url)
    if match:
        scheme = match.group(1).lower()
        url = url[match.end():]
    userinfo = host = port = None
    if url.startswith("//"):
        authority, slash, path = url[2:].partition("/")
        userinfo, host, port = _split_authority(authority)
        path = slash + path
    else:
        path = url
    return SplitURL(scheme, userinfo, host, port, path, query, fragment)


def effective_port(parts):
    """The explicit port, or the scheme's default port (``None`` if unknown)."""
    if parts.port is not None:
        return parts.port
    return DEFAULT_PORTS.get(parts.scheme)


def unsplit(parts):
    """Reassemble a URL string from a :class:`SplitURL`."""
    url = parts.scheme + ":" if parts.scheme else ""
    if parts.host is not None:
        url += "//"
        if parts.userinfo is not None:
            url += parts.userinfo + "@"
        url += parts.host
        if parts.port is not None:
            url += f":{parts.port}"
    url += parts.path
    if parts.query is not None:
        url += "?" + parts.query
    if parts.fragment is not None:
        url += "#" + parts.fragment
    return url
