"""Resolving relative references against a base URL (RFC 3986, section 5)."""

from .split import split_url, unsplit


def remove_dot_segments(path):
    """Remove ``.`` and ``..`` segments from ``path``.

    ``".."`` never climbs above the root, and a path ending in a dot segment
    keeps its trailing slash: ``"/a/b/.."`` becomes ``"/a/"``.
    """
    if not path:
        return path
    absolute = path.startswith("/")
    segments = path.split("/")[1:] if absolute else path.split("/")
    output = []
    for segment in segments:
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    if segments[-1] in (".", ".."):
        output.append("")
    result = "/".join(output)
    return "/" + result if absolute else result


def _merge(base, ref_path):
    if base.host is not None and base.path == "":
        return "/" + ref_path
    return base.path[: base.path.rfind("/") + 1] + ref_path


def join(base, ref):
    """Resolve the reference ``ref`` against the absolute URL ``base``."""
    b, r = split_url(base), split_url(ref)
    if r.scheme:
        return unsplit(r._replace(path=remove_dot_segments(r.path)))
    if r.host is not None:
        return unsplit(r._replace(scheme=b.scheme, path=remove_dot_segments(r.path)))
    if r.path == "":
        path, query = b.path, (r.query if r.query is not None else b.query)
    elif r.path.startswith("/"):
        path, query = remove_dot_segments(r.path), r.query
    else:
        path, query = remove_dot_segments(_merge(b, r.path)), r.query
    return unsplit(b._replace(path=path, query=query, fragment=r.fragment))
