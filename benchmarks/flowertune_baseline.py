"""The baseline of bench_scale.py: a plain Flower simulation whose ClientApp loads the base
model on every message, as FlowerTune's templates do (``get_model()`` inside the train
function), with Flower's own FedAvg (Message API). Same data, LoRA, steps and engine as
fedtune's simulator. The workload comes from $FEDTUNE_BENCH_SETS (``--set`` strings as
JSON) so Ray's workers, which import this module, build the same scenario.

    FEDTUNE_BENCH_SETS='["data.num_clients=100"]' PYTHONPATH=benchmarks \
        python -c "import flowertune_baseline as b; b.run()"

(imported, not run as ``__main__``: Ray's workers find the ClientApp by its module)
"""

from __future__ import annotations

import functools
import json
import os
import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedtune.config import load_scenario
from fedtune.data import clients_of, pack_texts
from fedtune.model.loading import load_base_model
from fedtune.model.lora import adapter_state, attach_lora, load_adapter_state
from fedtune.train import train_local

SCENARIO = load_scenario("tiny", json.loads(os.environ.get("FEDTUNE_BENCH_SETS", "[]")))
ROUND_ENDS: list[float] = []


@functools.lru_cache(maxsize=1)
def partitions() -> list:
    """The dataset, loaded once per worker (FlowerTune keeps a global FederatedDataset)."""
    return clients_of(SCENARIO.data, SCENARIO.run.seed)


def get_model() -> tuple:
    base, tokenizer = load_base_model(SCENARIO.model)
    return attach_lora(base, SCENARIO.lora, SCENARIO.run.seed), tokenizer


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    model, tokenizer = get_model()  # every message
    load_adapter_state(model, dict(msg.content["arrays"].to_torch_state_dict()))
    data = partitions()[int(context.node_config["partition-id"])]
    blocks = pack_texts(data.train, tokenizer, SCENARIO.data.seq_len)
    result = train_local(model, blocks, SCENARIO.train, SCENARIO.run.seed, "cpu")
    reply = RecordDict({"arrays": ArrayRecord(adapter_state(model)),
                        "metrics": MetricRecord({"num-examples": int(blocks.shape[0]),
                                                 "train-loss": float(result.loss)})})
    return Message(content=reply, reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    model, _ = get_model()
    initial = adapter_state(model)
    per_round = SCENARIO.federation.clients_per_round
    strategy = FedAvg(fraction_train=per_round / SCENARIO.data.num_clients,
                      min_train_nodes=per_round, fraction_evaluate=0.0,
                      min_available_nodes=SCENARIO.data.num_clients)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial),
                            num_rounds=SCENARIO.run.rounds,
                            evaluate_fn=lambda rnd, arrays: ROUND_ENDS.append(time.perf_counter()))
    if sorted(result.arrays.keys()) != sorted(initial):
        raise RuntimeError("the baseline's clients failed: no aggregated adapter")


def run() -> None:
    from flwr.simulation import run_simulation

    from fedtune.runs.simulate import backend_config

    run_simulation(server_app=server, client_app=client,
                   num_supernodes=SCENARIO.data.num_clients,
                   backend_config=backend_config(SCENARIO))
    if len(ROUND_ENDS) != SCENARIO.run.rounds + 1:
        raise SystemExit("the baseline did not complete its rounds")
    rounds = SCENARIO.run.rounds
    # rounds 2.. only: round 1 also pays each Ray worker's first imports
    print(json.dumps({"train_seconds": ROUND_ENDS[-1] - ROUND_ENDS[1],
                      "updates": (rounds - 1) * SCENARIO.federation.clients_per_round}))
