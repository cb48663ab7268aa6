"""Held-out replies of the base and the federated adapter (fedtune.runs.generations):
checked against a plain greedy loop on independently built models, shown escaped in the
report, off with report.generations = 0."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.config import load_scenario
from fedtune.model.lora import save_folded_adapter
from fedtune.model.tiny import build_byte_tokenizer, build_tiny_model
from fedtune.runs.generations import (
    Generation,
    held_out_prompts,
    pair_lines,
    prompt_of,
    read_generations,
    write_generations,
)
from fedtune.runs.report import render_report
from fedtune.runs.rundir import ADAPTER_DIR, GENERATIONS_FILE, SUMMARY_FILE

NEW_TOKENS = 6
LAYERS, HIDDEN, OUT = 2, 64, {"q_proj": 64, "v_proj": 32}  # fedtune.model.tiny's shapes


CLIENTS = ("alice", "bob", "carol")


def _scenario(tmp_path, count: int = 2, *extra: str):
    """The tiny model on three small JSONL clients (four records each, two held out)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name in CLIENTS:
        (data / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": f"{name} asks question {i}?\nanswer {i}"})
            + "\n" for i in range(4)))
    return load_scenario("tiny", ["data.source='jsonl'", f"data.path='{data}'",
                                  "data.num_clients=3", "data.eval_fraction=0.5",
                                  f"report.generations={count}",
                                  f"report.max_new_tokens={NEW_TOKENS}", *extra])


def _update(scale: float, rank: int = 2) -> dict[str, torch.Tensor]:
    """A LoRA state for every q / v projection of the tiny model: B @ A * ``scale``."""
    gen = torch.Generator().manual_seed(7)
    state = {}
    for layer in range(LAYERS):
        for module, out in OUT.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=gen)
            state[f"{key}.lora_B.weight"] = scale * torch.randn(out, rank, generator=gen)
    return state


def _run_dir(tmp_path, scenario, state):
    run_dir = tmp_path / "run"
    save_folded_adapter(run_dir / ADAPTER_DIR, state, scenario.lora, "tiny")
    (run_dir / SUMMARY_FILE).write_text(json.dumps(
        {"status": "completed", "scenario": scenario.to_dict(), "initial": {},
         "rounds": [], "final": {}}))
    return run_dir


def _plain_greedy(model, tokenizer, prompt: str, context: int) -> str:
    """Argmax, one token at a time, one unpadded prompt (its last ``context`` tokens, as
    the model was trained on): what the batched, left-padded generate should equal."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-context:]
    start = len(ids)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[start:], skip_special_tokens=True)


def _merged(state: dict[str, torch.Tensor]):
    """The tiny base with B @ A added to its weights by hand (no peft)."""
    model, _ = build_tiny_model(0)
    for name, weight in model.named_parameters():
        key = "base_model.model." + name.removesuffix(".weight")
        if f"{key}.lora_A.weight" in state:
            weight.data += state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]
    return model.eval()


def test_replies_equal_plain_greedy_decoding_of_base_and_merged_model(tmp_path):
    scenario, state = _scenario(tmp_path), _update(scale=0.5)
    run_dir = _run_dir(tmp_path, scenario, state)
    pairs = write_generations(scenario, run_dir)
    assert len(pairs) == 2 and read_generations(run_dir) == pairs
    base, tokenizer = build_tiny_model(0)
    merged = _merged(state)
    context = scenario.data.seq_len
    for pair in pairs:
        assert pair.base == _plain_greedy(base.eval(), tokenizer, pair.prompt, context)
        assert pair.adapter == _plain_greedy(merged, tokenizer, pair.prompt, context)
    assert any(p.base != p.adapter for p in pairs)  # this adapter changes the replies


def test_a_zero_adapter_replies_as_the_base_does(tmp_path):
    scenario = _scenario(tmp_path)
    pairs = write_generations(scenario, _run_dir(tmp_path, scenario, _update(scale=0.0)))
    assert len(pairs) == 2
    assert all(p.base == p.adapter and p.base for p in pairs)


def test_the_report_shows_the_replies_escaped(tmp_path):
    scenario = _scenario(tmp_path)
    run_dir = _run_dir(tmp_path, scenario, _update(scale=0.5))
    write_generations(scenario, run_dir)
    page = (run_dir / "report.html").read_text()
    pair = read_generations(run_dir)[0]
    assert "Replies to held-out prompts" in page
    from html import escape

    assert escape(pair.adapter) in page and escape(pair.prompt) in page
    hostile = {"client": "c", "prompt": "<script>alert(1)</script>", "base": "a & b\x1b[2J",
               "adapter": "</td></table>"}
    page = render_report(json.loads((run_dir / SUMMARY_FILE).read_text()), [hostile])
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &amp; b\ufffd[2J" in page and "&lt;/td&gt;&lt;/table&gt;" in page


def test_zero_generations_writes_nothing(tmp_path):
    scenario = _scenario(tmp_path, count=0)
    run_dir = _run_dir(tmp_path, scenario, _update(0.5))
    assert write_generations(scenario, run_dir) == []
    assert not (run_dir / GENERATIONS_FILE).exists()


def test_prompts_are_seeded_and_one_per_client_first(tmp_path):
    tokenizer = build_byte_tokenizer()
    scenario = _scenario(tmp_path)
    first = held_out_prompts(scenario, tokenizer, 5)
    assert first == held_out_prompts(scenario, tokenizer, 5)
    clients = [c for c, _ in first]
    assert sorted(clients[:3]) == list(CLIENTS) and clients[3:] == clients[:2]  # then again
    assert all(p.text.startswith(f"{c} asks question") and p.text.endswith("?\n")
               and p.shown == p.text for c, p in first)
    orders = {tuple(c for c, _ in held_out_prompts(_scenario(tmp_path, 2, f"run.seed={s}"),
                                                   tokenizer, 3)) for s in range(6)}
    assert len(orders) > 1  # the order comes from the run's seed


class _Conversation:
    """What fedtune.data's conversational records offer: ``as_dicts()``."""

    def __init__(self, turns):
        self.turns = turns

    def as_dicts(self):
        return [{"role": r, "content": c} for r, c in self.turns]


def test_prompt_of_plain_text_and_of_messages():
    tokenizer = build_byte_tokenizer()
    assert prompt_of("How are you?\nFine, thanks.", tokenizer).text == "How are you?\n"
    assert prompt_of("abcdefgh", tokenizer) == ("abcd", "abcd")  # one line: its first half
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"),
             ("user", "Bye?"), ("assistant", "Bye.")]
    expected = "<system>Be brief.<user>Hi<assistant>Hello<user>Bye?<assistant>"
    as_json = {"messages": [{"role": r, "content": c} for r, c in turns]}
    shown = "system: Be brief.\nuser: Hi\nassistant: Hello\nuser: Bye?"
    assert prompt_of(as_json, tokenizer, template) == (shown, expected)
    assert prompt_of(_Conversation(turns), tokenizer, template) == (shown, expected)
    # without a template conversations train as their turns, one line each
    assert prompt_of(_Conversation(turns), tokenizer).text == "Be brief.\nHi\nHello\nBye?\n"
    with pytest.raises(ValueError, match="neither text nor messages"):
        prompt_of(42, tokenizer)


def test_pair_lines_are_short_single_lines_a_terminal_cannot_act_on():
    pair = Generation("c1", "a\nb", "x" * 500, "\x1b[2Jy\rz\x08")
    lines = pair_lines(pair, limit=40)
    assert lines[0].endswith("a ⏎ b") and len(lines[1]) < 70 and lines[1].endswith("…")
    assert lines[2].endswith("\ufffd[2Jy\ufffdz\ufffd")
