"""The SDK client in a real local federation: a `fedtune server` process, SDK clients in
this process and a `fedtune client` process, on the tiny model.

One federation serves every test here (module fixture): alice runs to the end with
callbacks; bob (a model lent by the app) cancels in round 1; carol brings a model that
is not the federation's base and is stopped at the first message; the CLI client is a
bystander that must still be running when the run ends, and that gives up with an error
once the server has stopped answering for its ``--reconnect-for`` seconds.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import fedtune
from fedtune.model.tiny import build_byte_tokenizer, build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from harness import REPO, TINY, client, client_files  # noqa: E402

pytestmark = [pytest.mark.timeout(900), pytest.mark.e2e]

SETS = [*TINY, "data.num_clients=4", "run.rounds=2", "federation.min_clients=2",
        "federation.round_timeout=120"]


def _other_base() -> LlamaForCausalLM:
    """A Llama with the tiny model's module names but other widths: not the base."""
    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("sdk-federation")
    files = client_files(tmp / "data", 3)
    server = fedtune.Server(REPO / "server" / "server.toml", SETS, insecure=True,
                            address="127.0.0.1:0", out=tmp / "runs").start()
    port = int(server.address.rpartition(":")[2])
    bystander = client(tmp, port, files[2], ["--insecure", "--reconnect-for", "10"])
    lent, tokenizer = build_tiny_model(0)
    lent_before = {k: v.clone() for k, v in lent.state_dict().items()}
    try:
        alice = fedtune.Client(files[0].read_text().splitlines(), name="alice",
                               state_dir=tmp / "alice")
        bob = fedtune.Client(files[1], model=lent, tokenizer=tokenizer, name="bob",
                             state_dir=tmp / "bob")
        carol = fedtune.Client(files[1].read_text().splitlines()[:40], model=_other_base(),
                               tokenizer=tokenizer, name="carol", state_dir=tmp / "carol")
        bob_steps: list[int] = []

        def cancel_bob(progress: fedtune.Progress) -> None:
            if progress.kind == "step":
                bob_steps.append(progress.step)
                bob_session.cancel()

        bob_session = bob.start(server.address, insecure=True, on_progress=cancel_bob)
        carol_session = carol.start(server.address, insecure=True)
        reports: list[fedtune.RoundReport] = []
        alice_result = alice.run(server.address, insecure=True, on_round=reports.append)
        run_dir = server.wait(180)
        bystander_alive = bystander.process.poll() is None
        bystander_code = bystander.process.wait(120)  # the server is gone: it gives up
        yield SimpleNamespace(
            alice=alice_result, reports=reports, bob=bob_session.result(60), bob_steps=bob_steps,
            carol=carol_session, run_dir=run_dir, bystander_alive=bystander_alive,
            bystander_code=bystander_code, bystander_output=bystander.output(),
            lent=lent, lent_before=lent_before,
            summary=json.loads((run_dir / "summary.json").read_text()))
    finally:
        server.stop()
        bystander.stop()


def test_sdk_client_finishes_with_one_callback_per_round(federation: SimpleNamespace) -> None:
    assert federation.summary["status"] == "completed"
    assert federation.alice.status == "completed"
    assert [r.round for r in federation.reports] == [1, 2]
    assert federation.alice.rounds == federation.reports
    for report in federation.reports:
        assert math.isfinite(report.train_loss) and report.num_examples > 0
        assert report.metrics["seconds-train"] > 0
    assert sorted(federation.alice.eval_losses) == [0, 1, 2]


def test_cancelling_mid_round_leaves_the_federation_running(federation: SimpleNamespace
                                                            ) -> None:
    assert federation.bob.status == "cancelled"
    assert federation.bob.rounds == [] and federation.bob.adapter is None
    assert federation.bob_steps == [1]  # cancelled at the first step of round 1
    first, second = federation.summary["rounds"]
    assert first["clients_replied"] == 2 and len(first["dropped"]) >= 1
    assert second["clients_replied"] == 2
    assert federation.bystander_alive  # the other clients went on


def test_a_client_gives_up_once_the_server_stops_answering(federation: SimpleNamespace
                                                          ) -> None:
    assert federation.bystander_code == 1
    assert "stopped answering (given up after --reconnect-for 10 s)" in \
        " ".join(federation.bystander_output.split()), federation.bystander_output[-2000:]


def test_a_lent_model_is_given_back_unchanged(federation: SimpleNamespace) -> None:
    names = [name for name, _ in federation.lent.named_modules()]
    assert not any("lora" in name for name in names)
    after = federation.lent.state_dict()
    assert after.keys() == federation.lent_before.keys()
    assert all(torch.equal(after[k], v) for k, v in federation.lent_before.items())


def test_a_model_that_is_not_the_base_ends_its_session(federation: SimpleNamespace) -> None:
    with pytest.raises(fedtune.IncompatibleModelError, match="other shapes"):
        federation.carol.result(60)


def test_the_final_adapter_reaches_the_client_exactly(federation: SimpleNamespace) -> None:
    mine = load_file(str(federation.alice.adapter / "adapter_model.safetensors"))
    server = load_file(str(federation.run_dir / "adapter" / "adapter_model.safetensors"))
    assert mine.keys() == server.keys()
    assert all(torch.equal(mine[k], server[k]) for k in mine)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = build_byte_tokenizer()("Now is the winter of our discontent",
                                 return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_adapter_changes_outputs_and_the_merged_export_matches(
        federation: SimpleNamespace, tmp_path: Path) -> None:
    base, _ = fedtune.load_model("tiny")
    plain = _logits(base)
    tuned = fedtune.load_adapter(base, federation.alice)
    adapted = _logits(tuned)
    assert (adapted - plain).abs().max() > 1e-4
    merged_dir = fedtune.export_adapter(federation.run_dir, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(_logits(merged), adapted, atol=1e-5, rtol=1e-5)
