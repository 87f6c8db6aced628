"""Syllable counting and readability scores."""
import re

from .tokenize import sentences, words

_VOWEL_GROUP_RE = re.compile(r"[aeiouy]+")


def count_syllables(word):
    """Estimate the number of syllables in an English *word*.

    Counts groups of vowels, treating a final silent "e" as no syllable.
    Any non-empty word has at least one syllable; "" has none.
    """
    word = re.sub(r"[^a-z]", "", word.lower())
    if not word:
        return 0
    count = len(_VOWEL_GROUP_RE.findall(word))
    if word.endswith("e") and not word.endswith(("le", "ee")) and count > 1:
        count -= 1
    return max(count, 1)


def flesch_reading_ease(text):
    """Return the Flesch reading-ease score of *text* (higher is easier).

    The formula is ``206.835 - 1.015 * ASL - 84.6 * ASW`` where ASL is the
    average sentence length in words and ASW the average number of
    syllables per word. Text without any words scores 0.0.
    """
    ws = words(text)
    if not ws:
        return 0.0
    n_sent = max(len(sentences(text)), 1)
    n_syll = sum(count_syllables(w) for w in ws)
    return 206.835 - 1.015 * (len(ws) / n_sent) - 84.6 * (n_syll / len(ws))


def summary(text):
    """Return a dict of basic statistics about *text*."""
    ws = words(text)
    return {
        "words": len(ws),
        "sentences": len(sentences(text)),
        "syllables": sum(count_syllables(w) for w in ws),
        "avg_word_length": sum(len(w) for w in ws) / len(ws) if ws else 0.0,
        "flesch": flesch_reading_ease(text),
    }
