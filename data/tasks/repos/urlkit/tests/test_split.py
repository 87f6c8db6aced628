import pytest

from urlkit import effective_port, split_url, unsplit


def test_split_full_url():
    parts = split_url("HTTPS://user:pw@Example.COM:8443/a/b?x=1&y=2#frag")
    assert parts.scheme == "https"
    assert parts.userinfo == "user:pw"
    assert parts.host == "example.com"
    assert parts.port == 8443
    assert parts.path == "/a/b"
    assert parts.query == "x=1&y=2"
    assert parts.fragment == "frag"


def test_split_missing_parts():
    parts = split_url("http://example.com")
    assert (parts.host, parts.port, parts.path, parts.query, parts.fragment) == (
        "example.com", None, "", None, None)
    mail = split_url("mailto:joe@example.com")
    assert (mail.scheme, mail.host, mail.path) == ("mailto", None, "joe@example.com")
    rel = split_url("/just/a/path?q")
    assert (rel.scheme, rel.host, rel.path, rel.query) == ("", None, "/just/a/path", "q")


def test_fragment_may_contain_question_mark():
    parts = split_url("http://h/p#sec?x=1")
    assert parts.query is None
    assert parts.fragment == "sec?x=1"


def test_ipv6_host():
    parts = split_url("http://[::1]:8080/status")
    assert (parts.host, parts.port, parts.path) == ("[::1]", 8080, "/status")
    assert split_url("http://[FE80::1]/").port is None
    assert split_url("http://[FE80::1]/").host == "[fe80::1]"


def test_effective_port():
    assert effective_port(split_url("http://example.com/")) == 80
    assert effective_port(split_url("https://example.com/")) == 443
    assert effective_port(split_url("wss://example.com/socket")) == 443
    assert effective_port(split_url("http://example.com:8080/")) == 8080
    assert effective_port(split_url("gopher://example.com/")) is None


@pytest.mark.parametrize("url", ["http://h:99999/", "http://h:65536/", "http://h:80a/"])
def test_invalid_port(url):
    with pytest.raises(ValueError):
        split_url(url)


@pytest.mark.parametrize("url", [
    "https://user@example.com:8443/a/b?x=1#top",
    "mailto:joe@example.com",
    "file:///etc/hosts",
    "/relative/path?q=1",
    "http://[::1]:8080/",
])
def test_unsplit_roundtrip(url):
    assert unsplit(split_url(url)) == url
