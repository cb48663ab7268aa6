"""Nothing but adapter factors and scalar metrics (and, in a query reply, the client's
name and profile) can leave a client: ``messages.reply`` refuses anything else."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedtune.flower import messages as keys
from fedtune.flower.messages import PrivacyLeakError, check_outgoing


@pytest.fixture(autouse=True)
def _server_identity():
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


LORA = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(2, 4),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(4, 2)}


def _message():
    return Message(content=keys.make_content(None, {keys.ROUND: 1}), dst_node_id=5,
                   message_type=MessageType.TRAIN)


def test_factors_and_metrics_pass():
    out = keys.reply(_message(), {keys.TRAIN_LOSS: 1.5, keys.NUM_EXAMPLES: 3},
                     keys.state_to_record(LORA))
    assert set(out.content) == {keys.ADAPTER, keys.METRICS}


@pytest.mark.parametrize(("content", "message"), [
    (RecordDict({"texts": ConfigRecord({"t": "to be or not"})}), "may not carry the records"),
    (RecordDict({keys.ADAPTER: ArrayRecord({"input_ids": torch.arange(8)})}),
     "may hold LoRA factors"),
    (RecordDict({keys.IDENTITY: ConfigRecord({keys.CLIENT_NAME: "a", "data": "x"})}),
     "may carry only"),
])
def test_anything_else_is_refused(content, message):
    with pytest.raises(PrivacyLeakError, match=message):
        check_outgoing(content)


def test_per_example_values_in_metrics_are_refused():
    with pytest.raises(PrivacyLeakError, match="one number"):
        keys.reply(_message(), {"losses": [0.1, 0.2, 0.3]})


# ---- held to the assignment: shapes, dtype, packed blobs, frozen factors, DP metrics ----
A_KEY, B_KEY = sorted(LORA)
ASSIGNED = keys.Assignment({k: tuple(v.shape) for k, v in LORA.items()})


def _record(state):
    return keys.state_to_record(state)


def test_the_assigned_tensors_pass():
    keys.reply(_message(), {}, _record(LORA), assignment=ASSIGNED)


@pytest.mark.parametrize(("state", "message"), [
    ({A_KEY: torch.zeros(3, 4), B_KEY: torch.zeros(4, 3)}, r"shape \[3, 4\] differs"),
    ({A_KEY: torch.zeros(2, 4, 1), B_KEY: torch.zeros(4, 2)}, r"shape \[2, 4, 1\] differs"),
    ({A_KEY: torch.zeros(2, 4)}, "lacks assigned tensors"),
    ({**LORA, "base_model.model.layers.1.q_proj.lora_A.weight": torch.zeros(2, 4)},
     "only the assigned LoRA tensors"),
])
def test_a_tensor_the_client_was_not_assigned_is_refused(state, message):
    """A LoRA-looking key is not enough: the rank (a larger one smuggles more numbers),
    the dimensions and the set of tensors are those of the assignment."""
    with pytest.raises(PrivacyLeakError, match=message):
        keys.reply(_message(), {}, _record(state), assignment=ASSIGNED)


def test_a_tensor_of_another_dtype_is_refused():
    record = ArrayRecord({A_KEY: torch.zeros(2, 4, dtype=torch.float64),
                          B_KEY: torch.zeros(4, 2)})
    with pytest.raises(PrivacyLeakError, match="dtype float64"):
        check_outgoing(RecordDict({keys.ADAPTER: record}), ASSIGNED)


def test_pruning_allows_a_smaller_rank_only():
    pruned = {A_KEY: torch.zeros(1, 4), B_KEY: torch.zeros(4, 1)}
    with pytest.raises(PrivacyLeakError, match="differs"):
        keys.reply(_message(), {}, _record(pruned), assignment=ASSIGNED)
    keys.reply(_message(), {}, _record(pruned),
               assignment=keys.Assignment(ASSIGNED.shapes, pruning=True))


def _packed(state):
    from fedtune.core.compress import CompressionSpec

    return keys.encode_record(state, CompressionSpec(density=0.5, values="int8"))


def test_a_packed_blob_is_decoded_and_held_to_the_shapes():
    keys.reply(_message(), {}, _packed({k: torch.ones_like(v) for k, v in LORA.items()}),
               assignment=ASSIGNED)
    wider = {A_KEY: torch.ones(3, 4), B_KEY: torch.ones(4, 3)}
    with pytest.raises(PrivacyLeakError, match=r"shape \[3, 4\] differs"):
        keys.reply(_message(), {}, _packed(wider), assignment=ASSIGNED)
    garbage = ArrayRecord({keys.PACKED: torch.arange(64, dtype=torch.uint8)})
    with pytest.raises(PrivacyLeakError, match="does not decode"):
        keys.reply(_message(), {}, garbage, assignment=ASSIGNED)


def test_a_frozen_factor_must_come_back_as_it_was_sent():
    """ffa's A is frozen: a client that sends back another A sends numbers nobody asked
    for (dense), or a non-zero update of it (packed)."""
    frozen = keys.Assignment(ASSIGNED.shapes, frozen={A_KEY: LORA[A_KEY]})
    keys.reply(_message(), {}, _record(LORA), assignment=frozen)
    moved = {**LORA, A_KEY: LORA[A_KEY] + 1e-3}
    with pytest.raises(PrivacyLeakError, match="frozen but differs"):
        keys.reply(_message(), {}, _record(moved), assignment=frozen)
    update = {A_KEY: torch.ones(2, 4), B_KEY: torch.ones(4, 2)}
    with pytest.raises(PrivacyLeakError, match="frozen but the packed update changes it"):
        keys.reply(_message(), {}, _packed(update), assignment=frozen)


def test_under_dp_only_the_allowed_metrics_leave():
    private = keys.Assignment(ASSIGNED.shapes, metrics=frozenset({keys.PARTITION}))
    keys.reply(_message(), {keys.PARTITION: 1}, _record(LORA), assignment=private)
    with pytest.raises(PrivacyLeakError, match=r"data-dependent metrics \['train-loss'\]"):
        keys.reply(_message(), {keys.PARTITION: 1, keys.TRAIN_LOSS: 2.0}, _record(LORA),
                   assignment=private)
