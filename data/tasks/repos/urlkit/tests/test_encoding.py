from urlkit import quote, quote_plus, unquote, unquote_plus


def test_quote():
    assert quote("a b/c") == "a%20b/c"
    assert quote("a b/c", safe="") == "a%20b%2Fc"
    assert quote("café") == "caf%C3%A9"
    assert quote("~user-name_1.0") == "~user-name_1.0"


def test_unquote():
    assert unquote("a%20b%2Fc") == "a b/c"
    assert unquote("caf%C3%A9s") == "cafés"
    assert unquote("%E2%82%AC10") == "€10"
    assert unquote("%2f%2Fx") == "//x"


def test_unquote_leaves_malformed_escapes():
    assert unquote("100%") == "100%"
    assert unquote("%zz%") == "%zz%"
    assert unquote("%4") == "%4"


def test_plus_variants():
    assert quote_plus("a b&c=d") == "a+b%26c%3Dd"
    assert quote_plus("a/b") == "a%2Fb"
    assert unquote_plus("a+b%26c") == "a b&c"
