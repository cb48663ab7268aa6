"""A SecAgg+ client that trains like any other and then cheats in the protocol, by the
round it is in (its own count of secure rounds, kept in its node state):

1. adds 2^31 to one word of its masked vector (the range check must catch it);
2. sends a junk ciphertext to one neighbour (it must be dropped, the round go on);
3. does that and claims that another neighbour's shares did not open (two honest
   clients are left: the round must release nothing of theirs);
4. hands back junk for every share at unmask (the digests set them aside: the others'
   shares rebuild the seeds, the round is released with its vector in the sum).

Run as ``fedtune client --app tests.deploy.secagg_hostile_app:app``."""

from __future__ import annotations

import os

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedtune.flower import client_app as fedtune_client
from fedtune.flower import secagg

app = ClientApp()
COUNT = "tests.secagg-hostile"


def _round(context: Context, stage: str) -> int:
    """This client's secure round: counted at each train stage."""
    record = context.state.config_records.get(COUNT) or ConfigRecord({"round": 0})
    if stage == secagg.TRAIN:
        record["round"] = int(record["round"]) + 1
    context.state[COUNT] = record
    return int(record["round"])


def _cheat(attack_round: int, stage: str, message: Message, reply: Message) -> None:
    record = reply.content.config_records[secagg.SECAGG]
    if attack_round == 1 and stage == secagg.COLLECT:
        words = np.frombuffer(bytes(record["masked"]), dtype="<u4").copy()
        words[0] = words[0] + np.uint32(2**31)  # mod 2^32
        record["masked"] = words.tobytes()
    if attack_round in (2, 3) and stage == secagg.SHARE:
        texts = list(record["ciphertexts"])
        texts[0] = os.urandom(len(texts[0]))
        record["ciphertexts"] = texts
    if attack_round == 4 and stage == secagg.UNMASK:
        record["shares"] = [os.urandom(len(bytes(x))) for x in record["shares"]]
    if attack_round == 3 and stage == secagg.OPEN:
        sources = list(message.content.config_records[secagg.SECAGG]["sources"])
        record["rejected"] = [int(sources[-1])]


@app.train()
def train(message: Message, context: Context) -> Message:
    reply = fedtune_client.app(message=message, context=context)
    protocol = message.content.config_records.get(secagg.SECAGG)
    if protocol is None or reply.has_error():
        return reply
    stage = str(protocol["stage"])
    _cheat(_round(context, stage), stage, message, reply)
    return reply


app.evaluate()(lambda message, context: fedtune_client.app(message=message, context=context))
app.query()(lambda message, context: fedtune_client.app(message=message, context=context))
