from csvlite import format_field, parse, write_dicts, write_rows


def test_format_field_plain():
    assert format_field(3) == "3"
    assert format_field(None) == ""
    assert format_field("abc") == "abc"
    assert format_field(2.5) == "2.5"


def test_format_field_quoting():
    assert format_field("a,b") == '"a,b"'
    assert format_field('say "hi"') == '"say ""hi"""'
    assert format_field(" padded") == '" padded"'
    assert format_field("x\ny") == '"x\ny"'


def test_write_rows_custom_delimiter_and_terminator():
    text = write_rows([["a", "b"], [1, None]], delimiter="|", lineterminator="\r\n")
    assert text == "a|b\r\n1|\r\n"


def test_write_dicts_collects_fieldnames():
    text = write_dicts([{"a": 1, "b": 2}, {"b": 3, "c": "x"}])
    assert text == "a,b,c\n1,2,\n,3,x\n"
    assert write_dicts([{"a": 1}], fieldnames=["b", "a"], restval="-") == "b,a\n-,1\n"


def test_round_trip():
    rows = [["id", "text"], ["1", "hello, world"], ["2", "multi\nline"], ["3", ""]]
    assert parse(write_rows(rows)) == rows
