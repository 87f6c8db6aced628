from textstats.tokenize import sentences, words


def test_words_keep_inner_apostrophes():
    assert words("don't stop, it's 5 o'clock!") == ["don't", "stop", "it's", "5", "o'clock"]


def test_words_can_preserve_case():
    assert words("Hello, World -- again", lower=False) == ["Hello", "World", "again"]


def test_sentences_basic():
    text = "The cat sat.  The dog ran!\nThen it slept."
    assert sentences(text) == ["The cat sat.", "The dog ran!", "Then it slept."]


def test_sentences_blank():
    assert sentences("   \n  ") == []


def test_sentences_without_terminal_punctuation():
    assert sentences("no full stop here") == ["no full stop here"]
