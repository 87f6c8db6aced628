"""Formatting rows and records as CSV text."""


def format_field(value, delimiter=",", quotechar='"'):
    """Render one value as a CSV field, quoting it only when necessary.

    ``None`` becomes an empty field; a field is quoted when it contains the
    delimiter, the quote character or a line break, or has leading or trailing
    spaces.
    """
    text = "" if value is None else str(value)
    special = (delimiter, quotechar, "\n", "\r")
    if any(c in text for c in special) or text != text.strip(" "):
        return quotechar + text.replace(quotechar, quotechar * 2) + quotechar
    return text


def format_row(row, delimiter=",", quotechar='"'):
    """Render a sequence of values as one CSV line (without line terminator)."""
    return delimiter.join(format_field(v, delimiter, quotechar) for v in row)


def write_rows(rows, delimiter=",", quotechar='"', lineterminator="\n"):
    """Render rows as CSV text; every line ends with ``lineterminator``."""
    return "".join(format_row(r, delimiter, quotechar) + lineterminator for r in rows)


def write_dicts(records, fieldnames=None, delimiter=",", restval="", lineterminator="\n"):
    """Render dicts as CSV text with a header line.

    ``fieldnames`` defaults to the keys in order of first appearance; missing
    keys are written as ``restval``.
    """
    if fieldnames is None:
        fieldnames = []
        for record in records:
            fieldnames.extend(k for k in record if k not in fieldnames)
    rows = [list(fieldnames)]
    rows.extend([record.get(name, restval) for name in fieldnames] for record in records)
    return write_rows(rows, delimiter=delimiter, lineterminator=lineterminator)
