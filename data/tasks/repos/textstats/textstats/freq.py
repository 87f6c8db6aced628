"""Word frequencies and n-grams."""
from collections import Counter

from .tokenize import words


def word_frequencies(text, case_sensitive=False):
    """Map each word of *text* to its number of occurrences.

    By default "The" and "the" count as the same word; pass
    ``case_sensitive=True`` to keep them apart.
    """
    return dict(Counter(words(text, lower=not case_sensitive)))


def top_words(text, n=10, stopwords=()):
    """Return the *n* most frequent words of *text* as ``(word, count)`` pairs.

    Words listed in *stopwords* are skipped. Ties are broken alphabetically.
    """
    stop = {w.lower() for w in stopwords}
    counts = word_frequencies(text)
    items = [(w, c) for w, c in counts.items() if w not in stop]
    items.sort(key=lambda item: (-item[1], item[0]))
    return items[:n]


def ngrams(tokens, n):
    """Return all contiguous n-grams of *tokens* as tuples, in order."""
    if n < 1:
        raise ValueError("n must be at least 1")
    tokens = list(tokens)
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def ngram_frequencies(text, n=2):
    """Count the word n-grams of *text* (lower-cased words)."""
    return dict(Counter(ngrams(words(text), n)))
