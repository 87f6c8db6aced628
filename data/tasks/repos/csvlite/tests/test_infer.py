from csvlite import convert, infer_column, infer_value


def test_infer_value():
    assert infer_value("42") == 42
    assert infer_value(" 3.5 ") == 3.5
    assert infer_value("TRUE") is True
    assert infer_value("") is None
    assert infer_value("abc") == "abc"
    assert infer_value("1e3") == 1000.0


def test_infer_column():
    assert infer_column(["1", "2"]) is int
    assert infer_column(["1", "2.5"]) is float
    assert infer_column(["true", "False"]) is bool
    assert infer_column(["1", "x"]) is str
    assert infer_column(["1", "", "3"]) is int
    assert infer_column(["true", "1"]) is str
    assert infer_column([]) is str


def test_convert():
    assert convert("7", int) == 7
    assert convert("", float) is None
    assert convert(" yes", str) == " yes"
    assert convert("FALSE", bool) is False
