"""The one word/byte counting rule (data_pipeline.text.counting) on hand-counted cases."""

from data_pipeline.text import byte_count, word_count


def test_word_count_is_words_plus_one_per_line():
    assert word_count("") == 0
    assert word_count("a\n") == 2  # one word + <eos>
    assert word_count(" \n") == 1  # an empty line still has its <eos>
    assert word_count("a b\n") == 3
    assert word_count("a b\nc") == 5  # the last line without "\n" counts too
    assert word_count("a b\n\nc") == 6  # 3 words, 3 lines
    assert word_count(" = T = \n x , y . \n") == 3 + 4 + 2
    text = " = Valkyria Chronicles = \n\n Senjō no Valkyria 3 : Chronicles \n"
    assert word_count(text) == (4 + 1) + 1 + (6 + 1)
    assert word_count("one line without newline") == 5


def test_byte_count_is_utf8():
    assert byte_count("Senjō") == 6
    assert byte_count("日本") == 6
    assert byte_count("") == 0
