"""A test client that trains like any other and sends its honest update plus an extra
record of arrays (24 MB here; 1.5 GB in the issue): the ServerApp must refuse the reply
by its record names, before it reads the extra record, and go on."""

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedtune.flower import client_app as fedtune_client

EXTRA = "payload"
EXTRA_ARRAYS, EXTRA_FLOATS = 6, 2**20  # 6 x 4 MiB: each under Flower's 5 MB chunk


def bloated(inner: ClientApp) -> ClientApp:
    """``inner``, except that its train replies carry ``EXTRA`` too."""
    bloat = ClientApp()

    @bloat.train()
    def train(message: Message, context: Context) -> Message:
        reply = inner(message=message, context=context)
        if not reply.has_error():
            reply.content[EXTRA] = ArrayRecord({
                f"x{i}": Array(np.full(EXTRA_FLOATS, i, np.float32))
                for i in range(EXTRA_ARRAYS)})
        return reply

    @bloat.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return inner(message=message, context=context)

    @bloat.query()
    def query(message: Message, context: Context) -> Message:
        return inner(message=message, context=context)

    return bloat


def refused(inner: ClientApp) -> ClientApp:
    """What the server makes of ``bloated``: its train replies are errors (the in-process
    reference, whose Grid hands over replies already in memory)."""
    from flwr.app import Error

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return Message(error=Error(code=0, reason="refused"), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return inner(message=message, context=context)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return inner(message=message, context=context)

    return app


app = bloated(fedtune_client.app)
