"""The ServerApp of an attacker who can submit runs to the server's SuperLink (its
operator and SuperExec secrets, not the server's TLS key) and replays a sealed run
config it kept from an earlier server start: the config unchanged, so its seal opens;
only the ServerApp is the attacker's. It sends every connected client the message a
run starts with (who are you: name and device profile) and prints each answer."""

from __future__ import annotations

import json
import os
import time

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

#: the environment variable naming how many clients to wait for
NODES = "FEDTUNE_REPLAY_NODES"
#: the line this app prints, then a JSON object {node id: "served" or the error reason}
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
    print(ANSWERS, json.dumps(answers), flush=True)
