"""An admitted client that trains like any other and, in its first train reply, adds
1.5 GB of arrays in a record the server never asked for (the arrays' bytes are distinct,
so Flower pushes every chunk of them). Its later replies are honest."""

from __future__ import annotations

import itertools

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedtune.flower import client_app as fedtune_client

EXTRA_BYTES = 1_500_000_000
EXTRA_RECORD = "extra"

app = ClientApp()
_trained = itertools.count(1)


@app.train()
def train(message: Message, context: Context) -> Message:
    reply = fedtune_client.app(message=message, context=context)
    if next(_trained) == 1:
        reply.content[EXTRA_RECORD] = ArrayRecord(
            {"padding": Array(np.arange(EXTRA_BYTES // 8, dtype=np.int64))})
    return reply


app.evaluate()(lambda message, context: fedtune_client.app(message=message, context=context))
app.query()(lambda message, context: fedtune_client.app(message=message, context=context))
