"""A client that trains like any other, then attacks the server with its reply, one
attack per round: 1) other shapes than the base model's (sent as the round's first
reply: the honest clients of that test are ``patient``), 2) a packed reply of 82 bytes
declaring a 40000 x 40000 tensor, 3) one declaring 2**20 x 2**20 (too large to
allocate), 4) an honest adapter that claims 10**12 examples."""

from __future__ import annotations

import itertools
import time

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.core.compress import CompressionSpec, encode_indexed, pack_records
from fedtune.flower import client_app as fedtune_client
from fedtune.flower import messages as keys

app = ClientApp()
patient = ClientApp()
_trained = itertools.count(1)


def _packed_declaring(name: str, shape: tuple[int, int]):
    record = encode_indexed(shape, torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                            CompressionSpec(density=0.5))
    return keys.blob_to_record(pack_records([name], [record]))


@app.train()
def train(message: Message, context: Context) -> Message:
    reply = fedtune_client.app(message=message, context=context)
    state = keys.record_to_state(reply.content.array_records[keys.ADAPTER])
    first = sorted(state)[0]
    attack = next(_trained)
    if attack == 1:
        reply.content[keys.ADAPTER] = keys.state_to_record(
            {k: torch.zeros(v.shape[0], v.shape[1] + 3) for k, v in state.items()})
    elif attack == 2:
        reply.content[keys.ADAPTER] = _packed_declaring(first, (40000, 40000))
    elif attack == 3:
        reply.content[keys.ADAPTER] = _packed_declaring(first, (2**20, 2**20))
    elif attack == 4:
        metrics = reply.content.metric_records[keys.METRICS]
        metrics[keys.NUM_EXAMPLES] = 10**12
    return reply


@patient.train()
def patient_train(message: Message, context: Context) -> Message:
    time.sleep(4.0)  # so that the hostile reply is the round's first
    return fedtune_client.app(message=message, context=context)


for _app in (app, patient):
    _app.evaluate()(lambda message, context: fedtune_client.app(message=message,
                                                                context=context))
    _app.query()(lambda message, context: fedtune_client.app(message=message,
                                                             context=context))
