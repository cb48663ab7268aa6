"""A secret cohort under client-level DP, on the in-process Grid with the real strategy
and ClientApp: every release has the population's shape whoever was sampled, the run
directory holds no byte count or duration that could tell, and no file of it, nor the
server's log, names a client or gives a refusing client's reason (DP + SecAgg with a
client whose privacy floor is stricter than the run). The attacker reads everything the
server publishes and wants to know who took part."""

import contextlib
import json
import logging

import pytest
from flwr.app import MessageType
from safetensors.torch import load_file

from fedtune.config import load_scenario
from fedtune.flower import messages as keys
from fedtune.flower.client_app import make_client_app
from fedtune.flower.inprocess_grid import InProcessGrid
from fedtune.flower.server_app import run_federation
from fedtune.runs.rundir import new_run_dir

TINY = ["run.rounds=3", "train.steps=1", "data.max_samples_per_client=16", "data.seq_len=16",
        "data.max_eval_sequences=2", "report.generations=0"]
#: modules of the server's side: what they log is the server's log (a client's own log
#: stays on its device; in-process, both go to the "fedtune" logger)
CLIENT_SIDE = ("client_app.py", "/train/", "/model/", "/data/")


@contextlib.contextmanager
def _server_log():
    """Every record of the "fedtune" logger, down to DEBUG, split by side."""
    logger = logging.getLogger("fedtune")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _split(records):
    client = [r.getMessage() for r in records if any(s in r.pathname for s in CLIENT_SIDE)]
    server = [r.getMessage() for r in records if not any(s in r.pathname for s in CLIENT_SIDE)]
    return "\n".join(server), "\n".join(client)


def _profile(folder, rank):
    path = folder / f"rank{rank}.toml"
    path.write_text(f'name = "rank{rank}"\nmemory_budget_mb = 4000\ndevice = "cpu"\n'
                    f'quantization = "none"\nrank = {rank}\nalpha_ratio = 2.0\n')
    return str(path)


def _recording(app, sampled):
    """``app``, noting in ``sampled`` (round -> partitions) every train message it is
    sent (the secret the test knows and the attacker wants)."""
    def record(message, context):
        config = message.content.config_records.get(keys.CONFIG)
        if message.metadata.message_type == MessageType.TRAIN and config is not None:
            sampled.setdefault(int(config[keys.ROUND]), set()).add(
                int(context.node_config["partition-id"]))
        return app(message, context)
    return record


@pytest.fixture(scope="module")
def mixed_ranks_run(tmp_path_factory):
    """zeropad, central DP, one rank-8 client among three of rank 2, about 2 of 4 a
    round. Seeded (``privacy.reproducible``) so that the sample is known to vary: round
    1 goes without the rank-8 client, a later round with it (checked below)."""
    tmp = tmp_path_factory.mktemp("cohort")
    wide, narrow = _profile(tmp, 8), _profile(tmp, 2)
    scenario = load_scenario("tiny", [
        *TINY, 'federation.aggregator="zeropad"', "federation.clients_per_round=2",
        f'clients.profiles=["{wide}", "{narrow}", "{narrow}", "{narrow}"]',
        'privacy.mode="central"', "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.3",
        "privacy.delta=1e-3", "privacy.reproducible=true", "run.seed=0"])
    run_dir = new_run_dir(tmp, scenario.run.name)
    shapes: dict[int, set] = {}

    def progress(record):  # the adapter as published after each round
        if record["round"] == 0:  # the evaluation before training
            return
        tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
        shapes[record["round"]] = {k: tuple(t.shape) for k, t in tensors.items()}
    sampled: dict[int, set[int]] = {}
    with InProcessGrid(_recording(make_client_app(scenario), sampled), 4) as grid:
        run_federation(grid, scenario, run_dir, progress)
    return run_dir, sampled, shapes


def test_every_release_has_the_populations_rank_whoever_was_sampled(mixed_ranks_run):
    run_dir, sampled, shapes = mixed_ranks_run
    with_wide = [r for r, parts in sampled.items() if 0 in parts]
    without = [r for r in range(1, 4) if r not in with_wide]
    assert 1 in without and with_wide, f"the seed no longer varies the sample: {sampled}"
    assert len({frozenset(shapes[r].items()) for r in range(1, 4)}) == 1
    ranks = {shape[0] for key, shape in shapes[1].items() if "lora_A" in key}
    assert ranks == {8}  # round 1, without the rank-8 client: released at rank 8


def test_no_published_number_depends_on_who_was_sampled(mixed_ranks_run):
    """The records hold counts and the mechanism's numbers only: no bytes (a total would
    say whether the rank-8 client's larger payload went out), no durations; the same
    keys every round, and the dp numbers a function of the shape, not of the sample."""
    run_dir, sampled, _ = mixed_ranks_run
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = summary["rounds"]
    assert len(rounds) == 3
    assert len({frozenset(r) for r in rounds}) == 1
    withheld = {"bytes_up", "bytes_down", "bytes_up_dense", "seconds", "seconds_aggregate",
                "seconds_train_phase", "seconds_eval_phase", "dropped", "refused_names"}
    assert not withheld & set(rounds[0])
    assert {r["dp_noise_to_signal"] for r in rounds} == {rounds[0]["dp_noise_to_signal"]}
    assert [r["clients_sampled"] for r in rounds] == [len(sampled.get(n, ())) for n in
                                                      range(1, 4)]  # counts: published
    assert summary["totals"]["bytes_up"] is None and summary["totals"]["seconds"] is None
    privacy = summary["privacy"]
    assert "bytes" in privacy["withheld"]
    assert set(privacy["adapter_bytes_by_rank"]) == {"2", "8"}  # public per rank
    report = (run_dir / "report.html").read_text()
    assert "MB up" not in report and "Bytes per round" not in report


SECURE = ['federation.aggregator="ffa"', "privacy.secure_aggregation=true",
          'privacy.mode="distributed"']


@pytest.fixture(scope="module", params=[SECURE, ['privacy.mode="central"']],
                ids=["dp+secagg", "central-dp"])
def named_run(request, tmp_path_factory):
    """Five deployed clients known by name, under DP + SecAgg (distributed noise, ffa)
    and under central DP (the plain reply path); one has a privacy floor (z >= 100) far
    stricter than the run's z = 1 and refuses every round. q = 1: all five are sent
    work each round."""
    from tests.deploy.harness import client_files

    tmp = tmp_path_factory.mktemp("named")
    names = ["alice-7f3", "bob-52c", "carol-9ad", "dave-c41", "erin-e08"]
    files = client_files(tmp / "data", len(names))
    scenario = load_scenario("tiny", [
        *TINY, "run.rounds=2", "data.num_clients=5", "federation.clients_per_round=5",
        *request.param, "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.3",
        "privacy.delta=1e-3"])
    configs = [{"name": n, "data-path": str(f), "profile": ""}
               for n, f in zip(names, files, strict=True)]
    configs[2]["min-noise-multiplier"] = 100.0
    run_dir = new_run_dir(tmp, scenario.run.name)
    with _server_log() as records, InProcessGrid(make_client_app(scenario), 5,
                                                 node_configs=configs) as grid:
        run_federation(grid, scenario, run_dir)
    return run_dir, names, grid, *_split(records)


def test_no_file_of_the_run_directory_nor_the_servers_log_names_a_client(named_run):
    run_dir, names, grid, server_log, client_log = named_run
    assert [m for m in grid.delivered if m.message_type == MessageType.TRAIN]
    assert "client 'carol-9ad' refuses to train" in client_log  # the refusal happened, on its side
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"summary.json", "metrics.jsonl", "checkpoint.pt",
                                       "report.html", "scenario.json"}
    for name in names:
        for path in files:
            assert name.encode() not in path.read_bytes(), (name, path.name)
        assert name not in server_log, name
    for path in files:  # nor the refusal's reason
        assert b"refuses" not in path.read_bytes() and b"floor" not in path.read_bytes()
    assert "refuses" not in server_log and "floor 100" not in server_log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error")
    assert [r["clients_dropped"] for r in summary["rounds"]] == [1, 1]  # counted
    assert [r["clients_replied"] for r in summary["rounds"]] == [4, 4]


def test_distributed_dp_with_mixed_ranks_is_refused(tmp_path):
    """A client noises only the components of its own rank: with mixed ranks, the
    components of the population's rank above the smallest would carry less than z C
    (only the wider clients' shares), so the run refuses to start, naming the ranks."""
    from fedtune.config import ConfigError
    from fedtune.flower.strategy import FedtuneStrategy

    wide, narrow = _profile(tmp_path, 8), _profile(tmp_path, 2)
    scenario = load_scenario("tiny", [
        'federation.aggregator="zeropad"', f'clients.profiles=["{wide}", "{narrow}"]',
        'privacy.mode="distributed"', "privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match=r"one LoRA rank across clients, got \[2, 8\]"):
        FedtuneStrategy(scenario)


def test_under_distributed_dp_a_declared_profile_of_another_rank_falls_back():
    """A deployed client declaring a wider rank would make the ranks mixed mid-run: its
    profile is refused (it trains the server's settings) and the ranks stay one."""
    from fedtune.flower.strategy import FedtuneStrategy

    scenario = load_scenario("tiny", [
        "data.num_clients=3", 'federation.aggregator="zeropad"',
        'privacy.mode="distributed"', "privacy.noise_multiplier=1.0"])
    strategy = FedtuneStrategy(scenario)
    wide = ('name = "wide"\nmemory_budget_mb = 4000\ndevice = "cpu"\n'
            'quantization = "none"\nrank = 8\nalpha_ratio = 2.0\n')
    strategy._register_named({1: ("a", wide), 2: ("b", ""), 3: ("c", "")})
    assert {s.rank for s in strategy.settings} == {scenario.lora.rank}
    assert strategy.declared == {}
