from textstats.readability import count_syllables, flesch_reading_ease, summary


def test_count_syllables():
    expected = {"cat": 1, "table": 2, "make": 1, "banana": 3, "free": 1, "rhythm": 1, "": 0}
    for word, n in expected.items():
        assert count_syllables(word) == n, word


def test_flesch_empty_text():
    assert flesch_reading_ease("") == 0.0


def test_flesch_simple_text_scores_higher():
    simple = "The cat sat. The dog ran."
    hard = ("Notwithstanding considerable institutional opposition, the organisation "
            "implemented comprehensive administrative modifications.")
    assert flesch_reading_ease(simple) > flesch_reading_ease(hard)


def test_summary_counts():
    s = summary("The cat sat. The dog ran.")
    assert s["words"] == 6
    assert s["sentences"] == 2
    assert s["syllables"] == 6
    assert s["avg_word_length"] == 3.0
