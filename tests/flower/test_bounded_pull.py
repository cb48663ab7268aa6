"""A deployed server reads a reply through ``polling.pull_bounded``: real Flower messages,
deflated into Flower's own objects and served by id as the SuperLink serves them. A
reply with a record it may not carry is refused after its record names were read,
none of that record's objects; one larger than the budget after at most one object
past it; an honest one comes out as it was sent."""

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    iterate_object_tree,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from fedtune.flower import messages as keys
from fedtune.flower.polling import RefusedReply, pull_bounded
from fedtune.flower.replies import ReplyBudget, federation_reply_budget, reply_budget

MODULES = {"base_model.model.layer.0.q": (64, 64), "base_model.model.layer.0.v": (64, 16)}
BUDGET = reply_budget(MODULES, 8)


@pytest.fixture(autouse=True)
def _server_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7


def _honest_content():
    arrays = {}
    for name, (inp, out) in MODULES.items():
        arrays[name + ".lora_A.weight"] = Array(np.ones((8, inp), np.float32))
        arrays[name + ".lora_B.weight"] = Array(np.ones((out, 8), np.float32))
    return RecordDict({keys.ADAPTER: ArrayRecord(arrays),
                       keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 1.0})})


def _reply(content):
    sent = Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=7,
                   message_type=MessageType.TRAIN)
    return Message(content, reply_to=sent)


class Store:
    """The objects of one pushed message by id, and which of them were read."""

    def __init__(self, message):
        self.tree = get_object_tree(message)
        self.objects = {i: o.deflate() for i, o in get_all_nested_objects(message).items()}
        self.read = []

    def pull(self, object_id):
        self.read.append(object_id)
        return self.objects[object_id]

    def ids_under(self, record_name, message):
        record_id = message.content[record_name].object_id
        subtree = next(t for t in iterate_object_tree(self.tree) if t.object_id == record_id)
        return {t.object_id for t in iterate_object_tree(subtree)}


def test_an_honest_reply_comes_out_as_it_was_sent():
    message = _reply(_honest_content())
    store = Store(message)
    contents = pull_bounded(store.tree, store.pull, BUDGET)
    assert set(store.read) == set(store.objects)
    again = inflate_object_from_contents(message.object_id, contents)
    assert again.content[keys.ADAPTER].keys() == message.content[keys.ADAPTER].keys()
    for key, array in message.content[keys.ADAPTER].items():
        assert np.array_equal(again.content[keys.ADAPTER][key].numpy(), array.numpy())


def test_an_extra_record_of_arrays_is_refused_before_any_of_it_is_read():
    """An honest update plus 24 MB of arrays under a name a reply never has."""
    content = _honest_content()
    content["payload"] = ArrayRecord({f"x{i}": Array(np.full(2**20, i, np.float32))
                                      for i in range(6)})
    message = _reply(content)
    store = Store(message)
    with pytest.raises(RefusedReply, match=r"records it may not: \['payload'\]"):
        pull_bounded(store.tree, store.pull, ReplyBudget(max_bytes=0, max_objects=0))
    assert not set(store.read) & store.ids_under("payload", message)
    assert sum(len(store.objects[i]) for i in store.read) < 2000  # the record names only


def test_arrays_under_a_record_that_holds_none_are_refused_unread():
    content = _honest_content()
    content[keys.METRICS] = ArrayRecord({"x": Array(np.zeros(2**20, np.float32))})
    message = _reply(content)
    store = Store(message)
    with pytest.raises(RefusedReply, match="arrays in \\['metrics'\\]"):
        pull_bounded(store.tree, store.pull, BUDGET)
    assert not set(store.read) & store.ids_under(keys.METRICS, message)


def test_a_reply_past_the_byte_budget_is_refused_one_object_past_it():
    """Extra arrays inside the adapter record itself: the names pass, the bytes do not."""
    content = _honest_content()
    for i in range(8):
        content[keys.ADAPTER][f"extra{i}"] = Array(np.full(2**20, i, np.float32))
    message = _reply(content)
    store = Store(message)
    budget = ReplyBudget(max_bytes=BUDGET.max_bytes - 7 * 2**20)
    with pytest.raises(RefusedReply, match="larger than the"):
        pull_bounded(store.tree, store.pull, budget)
    read = sum(len(store.objects[i]) for i in set(store.read))
    largest = max(len(o) for o in store.objects.values())
    assert read <= budget.max_bytes + 16 * largest  # the pulls in flight at most
    assert read < sum(len(o) for o in store.objects.values()) / 2


def test_a_reply_of_more_objects_than_a_reply_can_have_is_refused_unread():
    content = _honest_content()
    content[keys.ADAPTER] = ArrayRecord({f"t{i}": Array(np.full(1, i, np.float32))
                                         for i in range(200)})
    store = Store(_reply(content))
    with pytest.raises(RefusedReply, match="objects, more than"):
        pull_bounded(store.tree, store.pull, BUDGET)
    assert store.read == []


def test_the_federation_budget_fits_the_largest_honest_reply_and_is_far_below_a_gigabyte():
    budget = federation_reply_budget("tiny", ("q_proj", "v_proj"))
    from fedtune.flower.replies import expected_modules
    from fedtune.model.memory import model_dims

    modules = expected_modules("tiny", ("q_proj", "v_proj"))
    rank = model_dims("tiny").max_rank(("q_proj", "v_proj"))
    dense = sum(rank * (i + o) for i, o in modules.values()) * 4
    assert dense < budget.max_bytes < 2**30
