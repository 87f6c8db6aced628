"""Parsing CSV text into rows and records."""

from .infer import convert, infer_column


class CSVError(ValueError):
    """Raised for malformed CSV input."""


def parse(text, delimiter=",", quotechar='"'):
    """Parse CSV ``text`` into a list of rows, each a list of strings.

    Fields may be wrapped in ``quotechar``; inside a quoted field the delimiter
    and line breaks are literal and a doubled quote stands for one quote
    character. ``\\n``, ``\\r\\n`` and ``\\r`` all end a record; blank lines are
    skipped.
    """
    if len(delimiter) != 1 or len(quotechar) != 1 or delimiter == quotechar:
        raise CSVError("delimiter and quotechar must be two different single characters")
    rows, row, field = [], [], []
    in_quotes = quoted = False
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if in_quotes:
            if ch != quotechar:
                field.append(ch)
            elif i + 1 < n and text[i + 1] == quotechar:
                field.append(quotechar)
                i += 1
            else:
                in_quotes = False
        elif ch == quotechar and not field and not quoted:
            in_quotes = quoted = True
        elif ch == delimiter:
            row.append("".join(field))
            field, quoted = [], False
        elif ch in "\r\n":
            if ch == "\r" and i + 1 < n and text[i + 1] == "\n":
                i += 1
            if row or field or quoted:
                row.append("".join(field))
                rows.append(row)
            row, field, quoted = [], [], False
        else:
            field.append(ch)
        i += 1
    if in_quotes:
        raise CSVError("unterminated quoted field at end of input")
    if row or field or quoted:
        row.append("".join(field))
        rows.append(row)
    return rows


def read_dicts(text, delimiter=",", fieldnames=None, restval=None, infer=False):
    """Parse CSV ``text`` into a list of dicts.

    The first row is the header unless ``fieldnames`` is given. Short rows are
    padded with ``restval``; rows with too many fields raise :class:`CSVError`.
    With ``infer=True`` each column is converted to the type that
    :func:`infer_column` finds for it.
    """
    rows = parse(text, delimiter=delimiter)
    if fieldnames is None:
        if not rows:
            return []
        fieldnames, rows = rows[0], rows[1:]
    width = len(fieldnames)
    records = []
    for number, row in enumerate(rows, start=1):
        if len(row) > width:
            raise CSVError(f"record {number} has {len(row)} fields, expected {width}")
        if len(row) < width:
            row = row + [restval] * (width - len(row))
        records.append(dict(zip(fieldnames, row)))
    if infer:
        for name in fieldnames:
            kind = infer_column([r[name] for r in records if r[name] is not None])
            for r in records:
                if r[name] is not None:
                    r[name] = convert(r[name], kind)
    return records
