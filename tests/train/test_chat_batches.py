"""A scenario's chat keys reach the client's blocks, and a tiny federation trains on them
through the real ClientApp (in-process Grid) with the held-out loss over assistant tokens."""

import json

from fedtune.config import load_scenario
from fedtune.data.tokenize import IGNORE_INDEX
from fedtune.flower.inprocess_grid import simulate_in_process
from fedtune.train.batches import client_batch


def _jsonl(tmp_path):
    """Two clients who answer in their own way; every record shape appears."""
    lines = []
    for i in range(24):
        question = f"What is {i} plus {i}?"
        lines += [{"client": "ann", "prompt": question, "response": f"It is {2 * i}."},
                  {"client": "bob", "messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": "Ask Ann."}]},
                  {"client": "ann", "instruction": "Add.", "input": f"{i} and 1",
                   "output": f"{i + 1}"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


def _scenario(tmp_path, *extra):
    return load_scenario("tiny", [
        "data.source='jsonl'", f"data.path='{_jsonl(tmp_path)}'", "data.num_clients=2",
        "data.seq_len=256", "data.chat_template='chatml'", "run.rounds=1", "train.steps=3",
        "train.batch_size=4", "data.max_eval_sequences=2",
        "report.generations=0", *extra])


def test_chat_keys_reach_the_blocks(tmp_path):
    batch = client_batch(_scenario(tmp_path), 0)
    assert batch.train.position_ids is not None and batch.eval.position_ids is not None
    labelled = batch.train.labels != IGNORE_INDEX
    assert 0 < int(labelled.sum()) < int((batch.train.position_ids > 0).sum()) // 2
    plain = client_batch(_scenario(tmp_path, "data.assistant_only_loss=false"), 0)
    assert int((plain.train.labels != IGNORE_INDEX).sum()) > 2 * int(labelled.sum())


def test_tiny_chat_federation_reports_assistant_token_loss(tmp_path):
    run_dir = simulate_in_process(_scenario(tmp_path), out_dir=tmp_path / "runs")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["eval_tokens"] == "assistant"
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
