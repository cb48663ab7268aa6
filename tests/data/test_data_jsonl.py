"""JSONL clients: directory and single-file modes, and errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.data import DataError, format_record, load_clients, load_jsonl
from fedtune.data.records import as_text


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def texts(clients, cid: str) -> list[str]:
    client = next(c for c in clients if c.client_id == cid)
    return sorted(as_text(r) for r in client.train + client.eval)


def test_format_record_shapes() -> None:
    assert format_record({"text": "hello"}) == "hello"
    assert format_record({"prompt": "Q?", "response": "A.", "client": "x"}) == "Q?\nA."
    with pytest.raises(DataError, match="none of the shapes"):
        format_record({"prompt": "only a prompt"})


def test_directory_mode_one_client_per_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "alice.jsonl", [{"text": f"a{i}"} for i in range(10)])
    pairs = [{"prompt": f"q{i}", "response": f"r{i}"} for i in range(4)]
    write_jsonl(tmp_path / "bob.jsonl", pairs)
    (tmp_path / "notes.txt").write_text("ignored")
    clients = load_jsonl(tmp_path, eval_fraction=0.2, seed=1)
    assert [c.client_id for c in clients] == ["alice", "bob"]
    assert texts(clients, "alice") == sorted(f"a{i}" for i in range(10))
    assert texts(clients, "bob") == sorted(f"q{i}\nr{i}" for i in range(4))
    alice = clients[0]
    assert len(alice.eval) == 2 and len(alice.train) == 8
    assert load_jsonl(tmp_path, eval_fraction=0.2, seed=1) == clients
    assert load_jsonl(tmp_path, eval_fraction=0.2, seed=2) != clients


def test_single_file_mode_groups_by_client_field(tmp_path: Path) -> None:
    records = [
        {"user": "u1", "text": "one"},
        {"user": "u2", "prompt": "hi", "response": "hello"},
        {"user": "u1", "text": "two"},
        {"user": "u2", "text": "bye"},
        {"user": 7, "text": "x"},
        {"user": 7, "text": "y"},
    ]
    path = write_jsonl(tmp_path / "all.jsonl", records)
    clients = load_jsonl(path, client_field="user")
    assert [c.client_id for c in clients] == ["u1", "u2", "7"]
    assert texts(clients, "u2") == ["bye", "hi\nhello"]
    assert all(len(c.eval) == 1 and len(c.train) == 1 for c in clients)


BAD_CASES = {
    "bad json": (['{"text": "ok"}', '{"text": '], 2, "invalid JSON"),
    "none of the shapes": (['{"text": "ok"}', '{"text": "ok2"}', '{"body": "x"}'], 3,
                           "none of the shapes"),
    "not an object": (['{"text": "ok"}', "[1, 2]"], 2, "JSON object"),
    "text not a string": (['{"text": 5}'], 1, "non-empty string"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_records_name_file_and_line(tmp_path: Path, case: str) -> None:
    lines, lineno, problem = BAD_CASES[case]
    (tmp_path / "carol.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_jsonl(tmp_path)
    assert f"carol.jsonl:{lineno}:" in str(err.value) and problem in str(err.value)


def test_missing_client_field_names_line(tmp_path: Path) -> None:
    path = tmp_path / "all.jsonl"
    path.write_text('{"client": "a", "text": "x"}\n\n{"text": "y"}\n')
    with pytest.raises(DataError, match=r"all\.jsonl:3: missing client field 'client'"):
        load_jsonl(path)


def test_empty_client_file_raises(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "full.jsonl", [{"text": "a"}, {"text": "b"}])
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl.*no records"):
        load_jsonl(tmp_path)


def test_client_with_one_record_raises(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "all.jsonl", [{"client": "a", "text": "x"}])
    with pytest.raises(DataError, match=r"all\.jsonl.*'a' has 1 record"):
        load_jsonl(path)


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.jsonl"):
        load_jsonl(tmp_path / "nowhere.jsonl")
    with pytest.raises(DataError, match=r"no \*\.jsonl files"):
        load_jsonl(tmp_path)


def test_load_clients_dispatch(tmp_path: Path) -> None:
    for name in "abcd":
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name}{i}"} for i in range(20)])
    clients = load_clients("jsonl", str(tmp_path), num_clients=2, seed=0, max_samples_per_client=5)
    assert len(clients) == 2 and all(len(c.train) == 5 and len(c.eval) == 2 for c in clients)
    assert clients == load_clients("jsonl", str(tmp_path), 2, seed=0, max_samples_per_client=5)
    with pytest.raises(DataError, match="shakespeare, chitchat, jsonl"):
        load_clients("csv", str(tmp_path))
    with pytest.raises(DataError, match="needs a path"):
        load_clients("jsonl", None)
    with pytest.raises(DataError, match="only 4"):
        load_clients("jsonl", str(tmp_path), num_clients=5)
