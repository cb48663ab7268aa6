"""A deployed client's own data file: read, split by its name, or refused with a reason."""

import json

import pytest

from fedtune.data import DataError
from fedtune.data.local import load_local, read_local_texts
from fedtune.data.records import Conversation


def test_text_file_gives_one_text_per_non_blank_line(tmp_path):
    path = tmp_path / "alice.txt"
    path.write_text("first line\n\n  second line  \nthird\n")
    assert read_local_texts(path) == ["first line", "second line", "third"]


def test_jsonl_file_uses_the_record_shapes(tmp_path):
    path = tmp_path / "bob.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"text": "hello"}, {"prompt": "q", "response": "a"}]))
    assert read_local_texts(path) == ["hello", Conversation((("user", "q"), ("assistant", "a")))]


def test_split_is_seeded_by_the_client_name_and_keeps_every_text(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(f"line {i}" for i in range(40)))
    a = load_local(path, "carol", eval_fraction=0.25, seed=3)
    again = load_local(path, "carol", eval_fraction=0.25, seed=3)
    other = load_local(path, "dave", eval_fraction=0.25, seed=3)
    assert (a.train, a.eval) == (again.train, again.eval)
    assert a.eval != other.eval
    assert sorted(a.train + a.eval) == sorted(f"line {i}" for i in range(40))
    assert len(a.eval) == 10


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "missing.txt", "does not exist"),
    (lambda d: d, "is a directory"),
    (lambda d: _write(d / "empty.txt", "\n \n"), "is empty"),
    (lambda d: _write(d / "one.txt", "only one\n"), "need at least 2"),
    (lambda d: _write(d / "bad.jsonl", '{"text": 1}\n'), "bad.jsonl:1"),
    (lambda d: _write_bytes(d / "bin.txt", b"\xff\xfe\x00"), "not UTF-8"),
])
def test_bad_data_is_refused_with_a_reason(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_local(make(tmp_path), "x")


def test_no_path_at_all_says_what_to_pass():
    with pytest.raises(DataError, match="--data"):
        read_local_texts("")


def _write(path, text):
    path.write_text(text)
    return path


def _write_bytes(path, data):
    path.write_bytes(data)
    return path
