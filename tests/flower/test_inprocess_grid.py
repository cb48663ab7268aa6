"""The in-process Grid the strategy-level tests run on behaves as the simulation engine
does where the strategy can tell: node ids, one Context per node that keeps its state,
message ids and reply_to, error replies, timeouts and lost nodes."""

from __future__ import annotations

import threading

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from fedtune.flower.inprocess_grid import InProcessGrid

release = threading.Event()


def _app() -> ClientApp:
    """Counts the messages each node handled in its own state; ``fail`` raises, ``hang``
    waits for the test."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        config = message.content.config_records["config"]
        seen = context.state.config_records.get("seen", ConfigRecord({"n": 0}))
        seen["n"] = int(seen["n"]) + 1
        context.state["seen"] = seen
        if config.get("fail", False):
            raise ValueError("asked to fail")
        if config.get("hang", False):
            release.wait(10)
        config["touched"] = True  # a handler changing what it received changes no one else
        return Message(RecordDict({"m": MetricRecord({
            "partition": int(context.node_config["partition-id"]),
            "partitions": int(context.node_config["num-partitions"]),
            "seen": int(seen["n"])})}), reply_to=message)

    return app


def _ask(node: int, **config) -> Message:
    return Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=node,
                   message_type=MessageType.QUERY)


@pytest.fixture
def grid():
    with InProcessGrid(_app(), 3, node_configs=[{"name": f"c{i}"} for i in range(3)],
                       workers=2) as made:
        yield made


def test_nodes_have_random_ids_partitions_and_their_own_state(grid):
    nodes = list(grid.get_node_ids())
    assert len(set(nodes)) == 3 and SUPERLINK_NODE_ID not in nodes
    assert [n.node_id for n in grid.get_nodes()] == nodes
    assert sorted(grid.partition_of(n) for n in nodes) == [0, 1, 2]
    assert grid.contexts[nodes[1]].node_config["name"] == "c1"
    first = grid.send_and_receive([_ask(n) for n in nodes], timeout=10)
    again = grid.send_and_receive([_ask(nodes[0])], timeout=10)
    by_node = {m.metadata.src_node_id: m.content["m"] for m in first}
    assert {n: (r["partition"], r["partitions"], r["seen"]) for n, r in by_node.items()} == {
        n: (grid.partition_of(n), 3, 1) for n in nodes}
    assert again[0].content["m"]["seen"] == 2  # the node's state persisted


def test_replies_answer_their_message_and_share_nothing_with_it(grid):
    node = grid.node_of(2)
    message = _ask(node)
    (message_id,) = grid.push_messages([message])
    assert message.metadata.message_id == message_id
    assert message.metadata.src_node_id == SUPERLINK_NODE_ID
    replies = []
    while not replies:
        replies = grid.pull_messages([message_id])
    (reply,) = replies
    assert reply.metadata.reply_to_message_id == message_id
    assert reply.metadata.dst_node_id == SUPERLINK_NODE_ID
    assert reply.metadata.message_id and reply.metadata.message_id != message_id
    assert "touched" not in message.content.config_records["config"]
    assert grid.pull_messages([message_id]) == []  # a reply is pulled once
    with pytest.raises(ValueError, match="already sent"):
        grid.push_messages([message])


def test_a_handler_that_raises_is_an_error_reply_and_its_state_change_is_lost(grid):
    node = grid.node_of(0)
    (reply,) = grid.send_and_receive([_ask(node, fail=True)], timeout=10)
    assert reply.has_error() and reply.metadata.src_node_id == node
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "ClientAppException" in reply.error.reason and "asked to fail" in reply.error.reason
    (ok,) = grid.send_and_receive([_ask(node)], timeout=10)
    assert ok.content["m"]["seen"] == 1  # the failed call did not count


def test_a_slow_node_misses_the_timeout_and_its_reply_comes_later(grid):
    release.clear()
    slow, quick = grid.node_of(0), grid.node_of(1)
    try:
        replies = grid.send_and_receive([_ask(slow, hang=True), _ask(quick)], timeout=0.5)
        assert [m.metadata.src_node_id for m in replies] == [quick]
    finally:
        release.set()


def test_a_lost_node_leaves_the_list_and_the_superlink_answers_for_it(grid):
    lost = grid.node_of(1)
    grid.lose_node(lost)
    assert lost not in grid.get_node_ids() and len(list(grid.get_node_ids())) == 2
    message = _ask(lost)
    (reply,) = grid.send_and_receive([message], timeout=10)
    assert reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE
    assert reply.metadata.src_node_id == SUPERLINK_NODE_ID
    assert reply.metadata.reply_to_message_id == message.metadata.message_id


def test_node_configs_must_match_the_nodes():
    with pytest.raises(ValueError, match="2 node configs for 3 nodes"):
        InProcessGrid(_app(), 3, node_configs=[{}, {}])


def test_exchange_waits_on_the_grid_instead_of_sleeping(grid, monkeypatch):
    """Each reply is taken the moment it is in (no poll backoff); a hanging node still
    ends the exchange at its deadline with the replies that came."""
    from fedtune.flower import polling

    def no_sleep(seconds: float) -> None:
        raise AssertionError(f"exchange slept {seconds} s on a grid it can wait on")

    monkeypatch.setattr(polling.time, "sleep", no_sleep)
    assert isinstance(grid, polling.WaitsForReplies)
    nodes = list(grid.get_node_ids())
    seen: list[int] = []
    replies = polling.exchange(grid, [_ask(n) for n in nodes], timeout=10,
                               report=lambda finished, sampled: seen.append(finished))
    assert sorted(m.metadata.src_node_id for m in replies) == sorted(nodes)
    assert seen[0] == 0 and seen[-1] == 3
    release.clear()
    try:
        late = polling.exchange(grid, [_ask(nodes[0], hang=True), _ask(nodes[1])],
                                timeout=0.5)
        assert [m.metadata.src_node_id for m in late] == [nodes[1]]
    finally:
        release.set()
