"""Word and sentence tokenisation."""
import re

# A word is a run of letters/digits, optionally joined by inner apostrophes.
WORD_RE = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z0-9]+)*")
# Sentences end with a full stop, an exclamation mark or a question mark.
SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+")


def words(text, lower=True):
    """Return the words of *text* in order.

    Punctuation is dropped; inner apostrophes are kept ("don't", "o'clock").
    With ``lower=True`` (the default) every word is lower-cased.
    """
    found = WORD_RE.findall(text)
    if lower:
        found = [w.lower() for w in found]
    return found


def sentences(text):
    """Split *text* into sentences.

    Runs of whitespace (including newlines) are collapsed to single spaces,
    and a sentence boundary is whitespace following terminal punctuation.
    Returns an empty list for blank text.
    """
    text = " ".join(text.split())
    if not text:
        return []
    return [s for s in SENTENCE_SPLIT_RE.split(text) if s]
