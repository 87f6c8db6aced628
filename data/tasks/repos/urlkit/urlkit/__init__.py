"""urlkit: URL splitting, percent-encoding, query strings and joining."""

from .encoding import quote, quote_plus, unquote, unquote_plus
from .join import join, remove_dot_segments
from .query import MultiDict, build_qs, parse_qs
from .split import DEFAULT_PORTS, SplitURL, effective_port, split_url, unsplit

__all__ = ["DEFAULT_PORTS", "MultiDict", "SplitURL", "build_qs", "effective_port", "join",
           "parse_qs", "quote", "quote_plus", "remove_dot_segments", "split_url",
           "unquote", "unquote_plus", "unsplit"]
