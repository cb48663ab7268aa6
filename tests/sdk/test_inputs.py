"""The SDK's checks, all before anything connects: data, profiles, models, names."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import tomllib
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import fedtune
from fedtune.config import load_scenario
from fedtune.data.local import read_local_texts
from fedtune.data.records import Conversation
from fedtune.model.compat import check_compatible, describe_base
from fedtune.model.tiny import build_byte_tokenizer, build_tiny_model
from fedtune.planning.profiles import DeviceProfile, load_profile
from fedtune.sdk.inputs import auto_profile, texts_from

TINY = load_scenario("tiny")


# ---- data ------------------------------------------------------------------------------
def test_texts_from_every_accepted_shape(tmp_path: Path) -> None:
    assert texts_from(["a b", "c d"]) == ["a b", "c d"]
    exchange = Conversation((("user", "q"), ("assistant", "r")))
    assert texts_from(iter([{"text": "x"}, {"prompt": "q", "response": "r"}])) == ["x", exchange]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert texts_from(jsonl) == ["one", "two"] == texts_from(str(jsonl))
    txt = tmp_path / "d.txt"
    txt.write_text("first\n\nsecond\n")
    assert texts_from(txt) == ["first", "second"]


@pytest.mark.parametrize(("data", "message"), [
    ([], "0 text"),
    (["only one"], "1 text"),
    ([{"title": "no text"}, "ok"], r"data\[0\].*none of the shapes"),
    (["ok", {"prompt": "q"}], r"data\[1\].*none of the shapes"),
    (["ok", 42], r"data\[1\] is a int"),
    (["ok", "   "], r"data\[1\] is an empty string"),
    ({"text": "a dict, not a list of them"}, "got dict"),
    (3.5, "got float"),
    ("one text\nwith lines", "line breaks"),
    ("/no/such/file.jsonl", "does not exist"),
])
def test_bad_data_raises_data_error_at_construction(data: object, message: str) -> None:
    with pytest.raises(fedtune.DataError, match=message):
        fedtune.Client(data)


def test_texts_are_held_in_memory_not_written(tmp_path: Path) -> None:
    from fedtune.data.local import register_texts, unregister_texts

    key = register_texts(["secret one", "secret two"])
    assert read_local_texts(key) == ["secret one", "secret two"]
    assert not Path(key).exists()
    unregister_texts(key)
    with pytest.raises(fedtune.DataError, match="another process"):
        read_local_texts(key)


# ---- profiles and names ----------------------------------------------------------------
def test_auto_profile_is_this_machine_and_a_valid_profile(tmp_path: Path) -> None:
    import psutil

    profile = auto_profile(rank=4)
    assert profile.device == ("cuda" if torch.cuda.is_available() else "cpu")
    available = psutil.virtual_memory().available / 2**20
    assert 0 < profile.memory_budget_mb <= available
    assert profile.quantization == "auto" and profile.rank == 4
    client = fedtune.Client(["a b", "c d"], profile="auto", state_dir=tmp_path,
                            federation=TINY)
    written = load_profile(client.profile)
    assert written.rank == TINY.lora.rank and written.quantization == "auto"
    assert tomllib.loads(Path(client.profile).read_text())["device"] == profile.device


def test_profiles_by_name_object_and_bad_name(tmp_path: Path) -> None:
    assert fedtune.Client(["a", "b"], profile="phone-class-4gb",
                          state_dir=tmp_path).profile == "phone-class-4gb"
    mine = DeviceProfile(name="mine", memory_budget_mb=900, device="cpu", rank=4)
    path = fedtune.Client(["a", "b"], profile=mine, state_dir=tmp_path).profile
    assert load_profile(path) == mine
    with pytest.raises(fedtune.ProfileError, match="no-such-profile"):
        fedtune.Client(["a", "b"], profile="no-such-profile")


def test_a_client_keeps_its_name_in_its_state_dir(tmp_path: Path) -> None:
    first = fedtune.Client(["a", "b"], state_dir=tmp_path).name
    assert fedtune.Client(["c", "d"], state_dir=tmp_path).name == first
    assert fedtune.Client(["a", "b"], state_dir=tmp_path / "other").name != first
    assert fedtune.Client(["a", "b"], name="given", state_dir=tmp_path).name == "given"


# ---- models ----------------------------------------------------------------------------
def test_the_base_itself_and_a_lent_copy_are_compatible() -> None:
    model, tokenizer = build_tiny_model(3)  # other weights, same architecture
    fedtune.Client(["a", "b"], model=model, tokenizer=tokenizer, federation=TINY)
    check_compatible("tiny", "tiny", TINY.lora.target_modules)
    kind, shapes = describe_base("tiny", ["q_proj", "v_proj"])
    assert kind == "llama" and len(shapes) == 4
    assert shapes["model.layers.0.self_attn.v_proj"] == (32, 64)  # 2 kv heads of 16


def test_another_architecture_is_refused_before_connecting() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300))
    with pytest.raises(fedtune.IncompatibleModelError, match="no linear module named"):
        fedtune.Client(["a", "b"], model=gpt2, tokenizer=build_byte_tokenizer(),
                       federation=TINY)


def test_other_shapes_are_refused_with_the_modules_named() -> None:
    tokenizer = build_byte_tokenizer()
    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64))
    with pytest.raises(fedtune.IncompatibleModelError,
                       match=r"q_proj \(32, 32\) vs \(64, 64\)"):
        fedtune.Client(["a", "b"], model=narrow, tokenizer=tokenizer, federation=TINY)
    deeper = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64,
                                          num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128))
    with pytest.raises(fedtune.IncompatibleModelError, match="has 2 the base does not"):
        fedtune.Client(["a", "b"], model=deeper, tokenizer=tokenizer, federation=TINY)


def test_a_peft_model_or_no_model_object_is_a_type_error() -> None:
    model, tokenizer = build_tiny_model(0)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="PeftModel"):
        fedtune.Client(["a", "b"], model=wrapped, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="loaded transformers model"):
        fedtune.Client(["a", "b"], model=torch.nn.Linear(2, 2))


def test_a_missing_model_path_is_model_not_found() -> None:
    with pytest.raises(fedtune.ModelNotFoundError, match="does not exist"):
        fedtune.Client(["a", "b"], model="./no/such/model")


# ---- connecting --------------------------------------------------------------------------
def test_no_tls_choice_and_no_server_are_federation_errors(tmp_path: Path) -> None:
    from fedtune.deploy.client import free_port

    client = fedtune.Client(["a b", "c d"], state_dir=tmp_path)
    with pytest.raises(fedtune.FederationError, match="--insecure"):
        client.start("127.0.0.1:1")
    start = time.monotonic()
    with pytest.raises(fedtune.FederationError, match="cannot reach the server"):
        client.run(f"127.0.0.1:{free_port()}", insecure=True, connect_wait=1)
    assert time.monotonic() - start < 30


def test_adapter_not_found_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(fedtune.AdapterNotFoundError, match="adapter_config.json"):
        fedtune.load_adapter("tiny", tmp_path)
    result = fedtune.FederationResult("cancelled")
    with pytest.raises(fedtune.AdapterNotFoundError, match="cancelled"):
        fedtune.export_adapter(result, tmp_path / "out")
