"""Admitted clients that train like any other and attack the server with their replies.

``app`` (tests/deploy/test_lifecycle.py) adds an extra record of 512 KiB to every train
reply, inside the front's per-message budget, so the ServerApp's own check is the one
tested: it must refuse the reply by its record names, before it reads the extra record,
and go on. Its evaluate replies claim a held-out loss of 0.01 over 10**15 tokens: the
server must drop them (the token count is a reply's weight in the federated loss).

``gigabytes`` (tests/deploy/test_flood.py) adds 1.5 GB in its first train reply only,
for the front's byte budget (or the ServerApp's object-tree check, whichever sees it
first); its other replies are honest. The extra arrays' bytes are distinct, so Flower
pushes every chunk of them (it sends an object once per content hash).
"""

from __future__ import annotations

import itertools

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedtune.flower import client_app as fedtune_client
from fedtune.flower import messages as keys

EXTRA = "payload"
#: what ``app``'s evaluate replies claim (the honest ones: ~5.5 over at most 256 tokens)
LIE = {keys.EVAL_LOSS: 0.01, keys.EVAL_TOKENS: 10**15}


def _extra_record(size: int) -> ArrayRecord:
    return ArrayRecord({"padding": Array(np.arange(size // 8, dtype=np.int64))})


def _lying(reply: Message) -> Message:
    if not reply.has_error():
        metrics = reply.content.metric_records[keys.METRICS]
        reply.content[keys.METRICS] = MetricRecord({**dict(metrics), **LIE})
    return reply


def bloated(inner: ClientApp, extra_bytes: int, every_reply: bool = True,
            lie_in_evaluation: bool = False) -> ClientApp:
    """``inner``, except that its train replies (every one, or the first only) carry
    ``EXTRA`` of ``extra_bytes`` too and, if asked, its evaluate replies lie."""
    bloat = ClientApp()
    trained = itertools.count(1)

    @bloat.train()
    def train(message: Message, context: Context) -> Message:
        reply = inner(message=message, context=context)
        if (next(trained) == 1 or every_reply) and not reply.has_error():
            reply.content[EXTRA] = _extra_record(extra_bytes)
        return reply

    @bloat.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        reply = inner(message=message, context=context)
        return _lying(reply) if lie_in_evaluation else reply

    @bloat.query()
    def query(message: Message, context: Context) -> Message:
        return inner(message=message, context=context)

    return bloat


def refused(inner: ClientApp) -> ClientApp:
    """What the server makes of ``app``'s train replies: errors (the in-process reference,
    whose Grid hands over replies already in memory); its evaluate replies lie the same."""
    reference = ClientApp()

    @reference.train()
    def train(message: Message, context: Context) -> Message:
        return Message(error=Error(code=0, reason="refused"), reply_to=message)

    @reference.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return _lying(inner(message=message, context=context))

    @reference.query()
    def query(message: Message, context: Context) -> Message:
        return inner(message=message, context=context)

    return reference


app = bloated(fedtune_client.app, 512 << 10, lie_in_evaluation=True)
gigabytes = bloated(fedtune_client.app, 1_500_000_000, every_reply=False)
