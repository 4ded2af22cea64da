"""Inputs for ``mode=predict``: the fields a task reads, from CSV/TSV, JSON lines or plain text.

Gold labels are not needed (when a file has them, the task may write them next to its predictions),
so the labelled readers, which insist on a label per row, do not serve here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.data.sources import decode_file, json_records, not_a_string, row_length_fix, table_reader
from lmlab.errors import LmlabError, file_error

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSON_SUFFIXES = {".jsonl", ".json"}


def read_records(path: Path, fields: list[str], setting: str, encoding: str = "utf-8",
                 optional: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One dict per example holding ``fields`` (and ``optional`` ones when present).

    A ``.txt`` (or any other) file is one example per non-blank line, read as the first field.
    ``setting`` names the config key that chooses the fields, for the error message.
    """
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "is not a file", "Set data.path to the file to predict on.")
    text = decode_file(path, encoding)
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix in CSV_SUFFIXES:
        reader = table_reader(text, suffix)  # as the labelled readers read the same file
        header = reader.fieldnames or []
        for name in fields:
            if name not in header:
                raise file_error(path, f"has no column '{name}' (columns: {', '.join(header) or 'none'})",
                                 f"Set {setting} to the column that holds it.", line=1)
        for record in reader:
            rows.append({k: record[k] for k in (*fields, *optional) if k in record and record[k] is not None})
    elif suffix in JSON_SUFFIXES:
        for number, record in json_records(path, text):
            missing = [name for name in fields if name not in record]
            if missing:
                raise file_error(path, f"has no field '{missing[0]}' (fields: {', '.join(sorted(record))})",
                                 f"Set {setting} to the field that holds it.", line=number)
            rows.append({k: record[k] for k in (*fields, *optional) if k in record})
    else:
        rows = [{fields[0]: line.strip()} for line in text.split("\n") if line.strip()]
    if not rows:
        raise file_error(path, "holds no examples", "Give one example per line or record.")
    return rows


def bad_field(row: dict[str, Any], field: str, path: Path, line: int, fix: str) -> LmlabError:
    """The error for a record whose ``field`` is missing (a CSV row shorter than its header, which
    read_records leaves without the column) or holds something other than a string; ``fix`` says
    what to do about the latter."""
    if field not in row:
        return file_error(path, f"has no value in column '{field}' (a row of fewer fields than its header)",
                          row_length_fix(path.suffix), line=line)
    return not_a_string(path, line, field, row[field], fix)


def line_of_record(path: Path, encoding: str, index: int) -> int:
    """The line where record ``index`` of ``read_records(path, ...)`` starts, for an error message.

    read_records keeps no line numbers; the file is read again for the one record an error names.
    """
    path = Path(path)
    text = decode_file(path, encoding)
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        reader = table_reader(text, suffix)
        start = reader.line_num + 1 if reader.fieldnames else 1  # reading the header moves line_num past it
        for i, _ in enumerate(reader):
            if i == index:
                return start
            start = reader.line_num + 1
    if suffix in JSON_SUFFIXES:
        return next(number for i, (number, _) in enumerate(json_records(path, text)) if i == index)
    return [number for number, line in enumerate(text.split("\n"), start=1) if line.strip()][index]
