"""Clients from JSON Lines: a folder with one file per client, or one file with a client field.

Each record has one of the shapes of ``fedtune.data.records`` (text, prompt/response, chat
messages, Alpaca). Errors name the file, the line and the field so a user can fix their
data without reading our code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedtune.data.partition import check_eval_fraction, split_train_eval
from fedtune.data.records import Record, as_text, parse_record
from fedtune.data.types import ClientData, DataError


def format_record(record: dict[str, Any]) -> str:
    """The plain training text of one record (a conversation's turns joined by newlines)."""
    return as_text(parse_record(record))


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, parsed object) for every non-blank line; bad JSON names its line."""
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {line.strip():.60}")
            yield lineno, record


def _record_at(path: Path, lineno: int, record: dict[str, Any]) -> Record:
    """parse_record, with the file and line added to any error."""
    try:
        return parse_record(record)
    except DataError as err:
        raise DataError(f"{path}:{lineno}: {err}") from None


def _client_id(path: Path, lineno: int, record: dict[str, Any], field: str) -> str:
    """The client a record of a single grouped file belongs to."""
    if field not in record:
        raise DataError(f"{path}:{lineno}: missing client field {field!r}")
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
        raise DataError(f"{path}:{lineno}: client field {field!r} must be a string, got {value!r}")
    return str(value)


def read_client_file(path: Path) -> list[Record]:
    """All records of a one-client file; an empty file is an error."""
    texts = [_record_at(path, lineno, record) for lineno, record in _records(path)]
    if not texts:
        raise DataError(f"{path}: client file has no records (every line is blank)")
    return texts


def read_grouped_file(path: Path, client_field: str) -> dict[str, list[Record]]:
    """Records per client of one file, clients in order of first appearance."""
    groups: dict[str, list[Record]] = {}
    for lineno, record in _records(path):
        cid = _client_id(path, lineno, record, client_field)
        groups.setdefault(cid, []).append(_record_at(path, lineno, record))
    if not groups:
        raise DataError(f"{path}: file has no records (every line is blank)")
    return groups


def _read_source(path: Path, client_field: str
                 ) -> tuple[dict[str, list[Record]], dict[str, Path]]:
    """Records per client and the file each client came from."""
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise DataError(f"no *.jsonl files in directory {path}")
        return {f.stem: read_client_file(f) for f in files}, {f.stem: f for f in files}
    if path.is_file():
        groups = read_grouped_file(path, client_field)
        return groups, dict.fromkeys(groups, path)
    raise DataError(f"JSONL path not found: {path} (expected a *.jsonl file or a directory)")


def load_jsonl(
    path: str | Path, eval_fraction: float = 0.1, seed: int = 0, client_field: str = "client"
) -> list[ClientData]:
    """Clients from a directory of ``*.jsonl`` (id = file stem) or one file grouped by field.

    Every client needs at least two records: one for train and one for eval.
    """
    check_eval_fraction(eval_fraction)
    groups, sources = _read_source(Path(path), client_field)
    clients = []
    for cid, texts in groups.items():
        if len(texts) < 2:
            raise DataError(
                f"{sources[cid]}: client {cid!r} has {len(texts)} record; need at least 2 "
                "(one train, one eval)"
            )
        train, held_out = split_train_eval(texts, eval_fraction, f"{seed}:{cid}")
        clients.append(ClientData(client_id=cid, train=train, eval=held_out))
    return clients
