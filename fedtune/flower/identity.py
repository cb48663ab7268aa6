"""Client names bound to node keys.

A deployed client says its name, and the name decides its place in the federation (its
partition, seeds and declared profile; a restarted client takes its old place). With
node authentication on, the SuperLink knows which registered key each node holds, so a
name is bound to the first key that claimed it: another key claiming that name is
refused and logged, and the client that owns the name keeps its place. Without node
authentication names are unauthenticated (first come, first served), as the docs say.
The binding lives in the checkpoint, so a resumed server keeps it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

log = logging.getLogger("fedtune")

Claim = tuple[str, str]  # (name, declared profile)


def key_fingerprint(public_key: bytes) -> str:
    return "SHA256:" + hashlib.sha256(public_key).hexdigest()[:32]


class NameKeys:
    """Which key owns which name (fingerprints, so a checkpoint holds no key bytes)."""

    def __init__(self, owners: Mapping[str, str] | None = None) -> None:
        self.owners: dict[str, str] = dict(owners or {})
        self.refused: list[str] = []  # what was refused, for the run record

    def admit(self, named: Mapping[int, Claim], node_keys: Mapping[int, bytes]
              ) -> dict[int, Claim]:
        """The claims to honour: each node's name must be unbound or bound to the key
        that node holds. Claims are taken in node id order within one discovery."""
        admitted: dict[int, Claim] = {}
        for node, (name, profile) in sorted(named.items()):
            key = node_keys.get(node, b"")
            if not key:
                self._refuse(f"node {node} claims the name {name!r} but holds no key")
                continue
            fingerprint = key_fingerprint(key)
            owner = self.owners.setdefault(name, fingerprint)
            if owner != fingerprint:
                self._refuse(f"node {node} claims the name {name!r} with key {fingerprint}, "
                             f"but that name belongs to key {owner}")
                continue
            admitted[node] = (name, profile)
        return admitted

    def _refuse(self, reason: str) -> None:
        log.warning("refused: %s", reason)
        self.refused.append(reason)

    def take_refused(self) -> list[str]:
        """The refusals since the last call (each round's record lists its own)."""
        refused, self.refused = self.refused, []
        return refused

    def state(self) -> dict[str, str]:
        return dict(self.owners)
