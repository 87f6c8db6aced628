"""textstats: small text-statistics helpers (tokens, frequencies, readability, wrapping)."""
from .tokenize import sentences, words
from .freq import ngram_frequencies, ngrams, top_words, word_frequencies
from .readability import count_syllables, flesch_reading_ease, summary
from .wrap import fill, wrap

__all__ = [
    "sentences", "words",
    "ngram_frequencies", "ngrams", "top_words", "word_frequencies",
    "count_syllables", "flesch_reading_ease", "summary",
    "fill", "wrap",
]
