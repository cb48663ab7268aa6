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
     "LoRA factors only"),
    (RecordDict({keys.IDENTITY: ConfigRecord({keys.CLIENT_NAME: "a", "data": "x"})}),
     "may carry only"),
])
def test_anything_else_is_refused(content, message):
    with pytest.raises(PrivacyLeakError, match=message):
        check_outgoing(content)


def test_per_example_values_in_metrics_are_refused():
    with pytest.raises(PrivacyLeakError, match="one number"):
        keys.reply(_message(), {"losses": [0.1, 0.2, 0.3]})
