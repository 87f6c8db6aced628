import pytest

from csvlite import CSVError, parse, read_dicts


def test_parse_simple():
    assert parse("a,b,c\n1,2,3\n") == [["a", "b", "c"], ["1", "2", "3"]]


def test_parse_quoted_delimiter_and_newline():
    text = 'name,note\n"Smith, J","line1\nline2"\n'
    assert parse(text) == [["name", "note"], ["Smith, J", "line1\nline2"]]


def test_parse_custom_delimiter_without_final_newline():
    assert parse("a;b\n1;2", delimiter=";") == [["a", "b"], ["1", "2"]]
    assert parse("x\ty", delimiter="\t") == [["x", "y"]]


def test_line_endings_and_blank_lines():
    assert parse("a,b\r\n\r\n1,2\r3,4\n\n") == [["a", "b"], ["1", "2"], ["3", "4"]]


def test_empty_fields():
    assert parse('a,,c\n,,\n""\n') == [["a", "", "c"], ["", "", ""], [""]]
    assert parse("") == []


def test_invalid_input_raises():
    with pytest.raises(CSVError):
        parse('a,"unterminated\n')
    with pytest.raises(CSVError):
        parse("a,b", delimiter='"')


def test_read_dicts_uses_header():
    records = read_dicts("id,name\n1,ann\n2,bob\n")
    assert records == [{"id": "1", "name": "ann"}, {"id": "2", "name": "bob"}]
    assert read_dicts("") == []


def test_read_dicts_fieldnames_and_restval():
    records = read_dicts("1,ann\n2\n", fieldnames=["id", "name"], restval="?")
    assert records == [{"id": "1", "name": "ann"}, {"id": "2", "name": "?"}]
    with pytest.raises(CSVError):
        read_dicts("a,b\n1,2,3\n")


def test_read_dicts_infer_types():
    text = "id,price,ok,name\n1,2.5,true,ann\n2,3,False,\n"
    assert read_dicts(text, infer=True) == [
        {"id": 1, "price": 2.5, "ok": True, "name": "ann"},
        {"id": 2, "price": 3.0, "ok": False, "name": ""},
    ]
