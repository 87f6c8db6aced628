import pytest

from textstats.freq import ngram_frequencies, ngrams, top_words, word_frequencies


def test_word_frequencies():
    assert word_frequencies("the cat and the hat") == {"the": 2, "cat": 1, "and": 1, "hat": 1}


def test_top_words_ties_alphabetical():
    assert top_words("b a c b a d", 3) == [("a", 2), ("b", 2), ("c", 1)]


def test_top_words_stopwords():
    assert top_words("the cat the dog the cat", 2, stopwords=["The"]) == [("cat", 2), ("dog", 1)]


def test_ngrams_start():
    assert ngrams("a b c d".split(), 2)[:2] == [("a", "b"), ("b", "c")]


def test_ngrams_short_input_and_invalid_n():
    assert ngrams(["a"], 2) == []
    with pytest.raises(ValueError):
        ngrams(["a", "b"], 0)


def test_ngram_frequencies():
    freq = ngram_frequencies("the cat saw the cat run", 2)
    assert freq[("the", "cat")] == 2
