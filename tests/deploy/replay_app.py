"""An attacker's server start that replays a sealed run config it kept from an earlier
start of the server: the config unchanged, so its seal still opens; only the ServerApp
is the attacker's. Its ServerApp sends every connected client the message a run starts
with (who are you: name and device profile) and prints each answer.

Run as ``python -m tests.deploy.replay_app server --resume RUN_DIR`` with
``REPLAYED`` naming the kept ``pyproject.toml``: ``fedtune server``'s own SuperLink,
front and lifecycle, but the run it submits is the kept one. It stands for anyone who
can submit runs to the server's SuperLink and has seen an earlier sealed config, but
holds no key to seal a new one."""

from __future__ import annotations

import json
import os
import time

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

#: the environment variable naming the kept pyproject.toml of the earlier start
REPLAYED = "FEDTUNE_REPLAYED_APP"
#: the environment variable naming how many clients to wait for
NODES = "FEDTUNE_REPLAY_NODES"
#: the line this app prints, then {"run_id": ..., "answers": {node: "served" or reason}}
ANSWERS = "replayed run, answers:"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline, wanted = time.monotonic() + 120, int(os.environ.get(NODES, "1"))
    nodes: list[int] = []
    while len(nodes) < wanted and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [Message(content=RecordDict(), message_type=MessageType.QUERY,
                        dst_node_id=node) for node in nodes]
    replies = grid.send_and_receive(messages, timeout=120)
    # by destination: the SuperLink answers for a node that is not there (from its own id)
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    answers = {str(asked[r.metadata.reply_to_message_id]):
               r.error.reason if r.has_error() else "served" for r in replies}
    print(ANSWERS, json.dumps({"run_id": context.run_id, "answers": answers}), flush=True)


def _replay() -> None:
    """``fedtune server`` submitting the kept sealed config with this module's app."""
    import runpy
    from pathlib import Path

    import tomllib

    from fedtune.deploy import server

    kept = tomllib.loads(Path(os.environ[REPLAYED]).read_text())
    honest_write_app = server.write_app

    def write_app(folder: Path, config: dict) -> Path:
        folder = honest_write_app(folder, kept["tool"]["flwr"]["app"]["config"])
        project = folder / "pyproject.toml"
        project.write_text(project.read_text().replace("fedtune.flower.server_app:app",
                                                       "tests.deploy.replay_app:app"))
        return folder

    server.seal_config = lambda config, cert, key: config  # no key is used: it replays
    server.write_app = write_app
    runpy.run_module("fedtune.cli", run_name="__main__")


if __name__ == "__main__":
    _replay()
