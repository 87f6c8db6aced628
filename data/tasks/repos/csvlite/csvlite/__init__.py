"""A small CSV reader and writer with column type inference, written from scratch."""

from .infer import convert, infer_column, infer_value
from .reader import CSVError, parse, read_dicts
from .writer import format_field, format_row, write_dicts, write_rows

__all__ = [
    "CSVError", "convert", "format_field", "format_row", "infer_column",
    "infer_value", "parse", "read_dicts", "write_dicts", "write_rows",
]
