"""A test client that trains like any other and then sends NaN factors: the server must
reject its reply and go on."""

import math

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedtune.flower import client_app as fedtune_client
from fedtune.flower import messages as keys


def poisoned(inner: ClientApp) -> ClientApp:
    """``inner``, except that its train replies carry NaN factors."""
    evil = ClientApp()

    @evil.train()
    def train(message: Message, context: Context) -> Message:
        reply = inner(message=message, context=context)
        state = keys.record_to_state(reply.content.array_records[keys.ADAPTER])
        reply.content[keys.ADAPTER] = ArrayRecord(
            {k: torch.full_like(v, math.nan) for k, v in state.items()})
        return reply

    @evil.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return inner(message=message, context=context)

    @evil.query()
    def query(message: Message, context: Context) -> Message:
        return inner(message=message, context=context)

    return evil


app = poisoned(fedtune_client.app)
