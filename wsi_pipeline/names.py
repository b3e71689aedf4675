"""Slide names and messages made safe to show: one printable line, and inert in a spreadsheet.

File names may hold control characters (a carriage return splits a CSV row or an error line)
and bytes that are not UTF-8 (Python keeps them as lone surrogates, which cannot be encoded).
:func:`printable` shows both as backslash escapes; :func:`csv_cell` also neutralises a cell a
spreadsheet would run as a formula (leading ``= + - @``, tab or carriage return) with a leading
apostrophe, as OWASP recommends.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["printable", "csv_cell", "FORMULA_PREFIXES"]

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "\n")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` with undecodable bytes as ``\\xNN`` and control characters as ``\\r``, ``\\t``, ``\\x1b``..."""
    text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def csv_cell(value: Any) -> Any:
    """A CSV cell: numbers as they are; text printable and, when it would start a formula, quoted with ``'``."""
    if not isinstance(value, str):
        return value
    if value.startswith(FORMULA_PREFIXES):
        value = "'" + value
    return printable(value)
