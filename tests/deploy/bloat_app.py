"""A test client that trains like any other and sends its honest update plus an extra
record of arrays (512 KiB here: inside the front's per-message budget, so the ServerApp's
own check is the one tested; the front refuses 1.5 GB, tests/deploy/test_flood.py): the
ServerApp must refuse the reply by its record names, before it reads the extra record,
and go on."""

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedtune.flower import client_app as fedtune_client

EXTRA = "payload"
EXTRA_ARRAYS, EXTRA_FLOATS = 2, 2**16  # 2 x 256 KiB: within the front's byte budget


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
