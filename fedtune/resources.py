"""The files fedtune ships: bundled scenarios, device profiles and the server example.

This is the one place that knows where they are. They live in the package as
``fedtune/bundled/{simulations,profiles,server}``, found with ``importlib.resources``
from any working directory, in a checkout and in an installed wheel alike. In the
repository those three entries are symbolic links to the top-level ``simulations/``,
``clients/profiles/`` and ``server/`` folders (the single source); building the wheel
copies the files they point to (``[tool.setuptools.package-data]`` in pyproject.toml).

Importing this module loads nothing heavy (the command line's ``--help`` uses it).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: kind -> (the folder inside ``fedtune/bundled``, the repository folder it mirrors)
KINDS = {
    "scenario": ("simulations", "simulations"),
    "profile": ("profiles", "clients/profiles"),
    "server": ("server", "server"),
}
SUFFIX = ".toml"


class BundledFileMissing(LookupError):
    """A file that should ship with fedtune is not there (a broken installation)."""


def folder(kind: str) -> Path:
    """The folder of bundled files of ``kind`` (``scenario``, ``profile``, ``server``)."""
    inside, repository_folder = KINDS[kind]
    package = files("fedtune")
    found = package / "bundled" / inside
    if not isinstance(found, Path):  # a zipped install: not supported, say so
        raise BundledFileMissing(f"fedtune's bundled {kind} files are not on the file "
                                 f"system ({found}); install fedtune unzipped")
    if not found.is_dir():
        # a Flower app bundle (`flwr run`): flwr copies the project's files but not the
        # symbolic links, so the top-level folders sit beside the package instead
        beside = found.parents[2] / repository_folder
        if beside.is_dir():
            return beside
    return found


def names(kind: str) -> list[str]:
    """The bundled names of ``kind`` (file stems), sorted; empty if none ship."""
    where = folder(kind)
    if not where.is_dir():
        return []
    return sorted(p.stem for p in where.glob(f"*{SUFFIX}"))


def path(kind: str, name: str) -> Path:
    """The bundled file ``name`` (a stem such as ``tiny``, or ``tiny.toml``) of ``kind``;
    ``BundledFileMissing`` if it does not ship."""
    file_name = name if name.endswith(SUFFIX) else name + SUFFIX
    found = folder(kind) / file_name
    if not found.is_file():
        raise BundledFileMissing(
            f"bundled {kind} {name!r} is not in this installation ({found}); bundled: "
            f"{', '.join(names(kind)) or '(none: reinstall fedtune)'}")
    return found


def from_repository_path(text: str | Path) -> Path | None:
    """The bundled copy of a file named as the repository spells it
    (``server/server.toml``, ``simulations/tiny.toml``, ``clients/profiles/x.toml``), so
    documented commands work outside a checkout; None if ``text`` names no bundled file."""
    relative = Path(text)
    if relative.is_absolute():
        return None
    for kind, (_, repository_folder) in KINDS.items():
        if relative.parent == Path(repository_folder) and relative.suffix == SUFFIX:
            candidate = folder(kind) / relative.name
            return candidate if candidate.is_file() else None
    return None


def default_scenario() -> Path:
    """The scenario ``fedtune simulate`` runs without ``-s``."""
    return path("scenario", "default")


def server_example() -> Path:
    """The server scenario of ``server/README.md`` (``fedtune server --config ...``)."""
    return path("server", "server")
