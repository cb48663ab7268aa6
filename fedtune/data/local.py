"""One deployed client's own data: a local file that never leaves its machine.

``*.jsonl`` holds one record per line (the shapes of ``fedtune.data.jsonl``); any other
text file (``*.txt``) gives one training text per non-blank line. The split into train
and held-out texts is seeded by the client's name, so a restarted client trains and
evaluates on the same split.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from fedtune.data.jsonl import read_client_file
from fedtune.data.partition import cap_samples, split_train_eval
from fedtune.data.records import Record
from fedtune.data.types import ClientData, DataError

#: data-path prefix of texts an application handed over in memory (``register_texts``)
MEMORY_PREFIX = "memory:"
_held: dict[str, list[Record]] = {}
_numbers = itertools.count(1)


def register_texts(texts: list[Record]) -> str:
    """Keep an application's texts in this process under a data path that stands for
    them (the SDK: data that is never written to disk by fedtune)."""
    key = f"{MEMORY_PREFIX}{next(_numbers)}"
    _held[key] = list(texts)
    return key


def unregister_texts(key: str) -> None:
    _held.pop(key, None)


def read_local_texts(path: str | Path) -> list[Record]:
    """The records of a client's data file (texts, or conversations from a *.jsonl), or a
    DataError that says what is wrong with it."""
    if str(path).startswith(MEMORY_PREFIX):
        if str(path) not in _held:
            raise DataError(f"data path {path} names texts held by another process")
        return list(_held[str(path)])
    file = Path(path)
    if not str(path):
        raise DataError("no data path given: pass --data FILE (a *.jsonl or a text file)")
    if not file.exists():
        raise DataError(f"data path {file} does not exist")
    if file.is_dir():
        raise DataError(f"data path {file} is a directory; give one *.jsonl or text file")
    if file.suffix == ".jsonl":
        return read_client_file(file)
    try:
        texts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise DataError(f"data file {file} is not UTF-8 text") from None
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"data file {file} is empty (no non-blank line)")
    return texts


def load_local(path: str | Path, name: str, eval_fraction: float = 0.1, seed: int = 0,
               max_samples: int | None = None) -> ClientData:
    """A deployed client's texts split into train and held-out (at least one each)."""
    texts = read_local_texts(path)
    if len(texts) < 2:
        raise DataError(f"data file {path} has {len(texts)} text; need at least 2 "
                        "(one to train on, one held out)")
    train, held_out = split_train_eval(texts, eval_fraction, f"{seed}:{name}")
    return ClientData(name, cap_samples(train, max_samples, f"{seed}:{name}:cap"), held_out)
