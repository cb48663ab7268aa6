"""Record formats, chat templates and assistant-only labels.

The masking test checks labels against an independent account of which tokens are the
assistant's: each assistant reply is tokenised on its own (with the template's end of
turn) and must appear, in order, as exactly the labelled tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.data import DataError, load_jsonl
from fedtune.data.chat import CHATML, encode_conversation, pack_records, resolve_template
from fedtune.data.records import Conversation, as_text, parse_record
from fedtune.data.tokenize import IGNORE_INDEX
from fedtune.model.loading import load_tokenizer
from fedtune.model.tiny import build_byte_tokenizer

EXCHANGE = Conversation((("user", "What is 2+2?"), ("assistant", "Four.")))


def test_every_format_parses_to_the_same_messages() -> None:
    shapes = [
        {"prompt": "What is 2+2?", "response": "Four."},
        {"messages": [{"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": "Four."}]},
        {"instruction": "What is 2+2?", "output": "Four."},
        {"instruction": "What is 2+2?", "input": "", "output": "Four."},
    ]
    assert [parse_record(s) for s in shapes] == [EXCHANGE] * len(shapes)
    assert parse_record({"text": "plain"}) == "plain"
    with_input = parse_record({"instruction": "Add.", "input": "2 and 2", "output": "4"})
    assert with_input.messages == (("user", "Add.\n\n2 and 2"), ("assistant", "4"))
    assert as_text(EXCHANGE) == "What is 2+2?\nFour."  # the plain text of old


@pytest.mark.parametrize(("record", "problem"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
     "messages[0]: field 'content'"),
    ({"messages": "hi"}, "field 'messages' must be a non-empty list"),
    ({"instruction": "do", "output": 3}, "field 'output'"),
    ({"instruction": "do", "input": 1, "output": "x"}, "field 'input'"),
    ({"output": "x"}, "field 'instruction' is missing"),
])
def test_malformed_record_is_refused_with_file_line_and_field(
        tmp_path: Path, record: dict, problem: str) -> None:
    good = {"prompt": "q", "response": "r"}
    (tmp_path / "ann.jsonl").write_text("\n".join(json.dumps(r) for r in [good, good, record]))
    with pytest.raises(DataError) as err:
        load_jsonl(tmp_path)
    assert "ann.jsonl:3:" in str(err.value) and problem in str(err.value)


def _labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of labelled tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return runs


@pytest.mark.parametrize("tokenizer", [build_byte_tokenizer(), load_tokenizer("smollm2")],
                         ids=["tiny-byte-chatml", "smollm2"])
def test_only_assistant_tokens_are_in_the_loss(tokenizer) -> None:
    conversation = Conversation((("system", "Be terse."), ("user", "Hi there"),
                                 ("assistant", "Hello!"), ("user", "And you?"),
                                 ("assistant", "Fine, thanks.")))
    template = resolve_template("base", tokenizer)
    example = encode_conversation(conversation, tokenizer, template, assistant_only=True)
    end_of_turn = "<|im_end|>\n"  # both templates are ChatML
    replies = [tokenizer(f"{reply}{end_of_turn}", add_special_tokens=False)["input_ids"]
               for reply in ("Hello!", "Fine, thanks.")]
    assert _labelled_runs(example.input_ids, example.labels) == replies
    everything = encode_conversation(conversation, tokenizer, template, assistant_only=False)
    assert everything.labels == everything.input_ids == example.input_ids


def test_a_tokenizer_without_template_gets_chatml_and_a_named_file_is_read(tmp_path) -> None:
    tokenizer = build_byte_tokenizer()
    assert resolve_template("base", tokenizer) == CHATML
    own = tmp_path / "mine.jinja"
    own.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[assistant] {% endif %}")
    example = encode_conversation(EXCHANGE, tokenizer, resolve_template(str(own), tokenizer),
                                  assistant_only=True)
    assert tokenizer.decode(example.input_ids) == "[user] What is 2+2?\n[assistant] Four.\n"
    labelled = [t for t, label in zip(example.input_ids, example.labels, strict=True)
                if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "Four.\n"
    with pytest.raises(DataError, match="chat_template"):
        resolve_template(str(tmp_path / "missing.jinja"), tokenizer)


def test_plain_text_stays_plain_and_no_template_keeps_the_old_blocks() -> None:
    tokenizer = build_byte_tokenizer()
    old = pack_records([EXCHANGE, "some text"] * 8, tokenizer, 16)
    assert old.position_ids is None and bool((old.labels == old.input_ids).all())
    stream = tokenizer("What is 2+2?\nFour.", add_special_tokens=False)["input_ids"]
    assert old.input_ids.view(-1)[: len(stream)].tolist() == stream
    packed = pack_records([EXCHANGE, "some text"], tokenizer, 128, "chatml")
    text_ids = tokenizer("some text", add_special_tokens=False)["input_ids"]
    row, labels = packed.input_ids[0].tolist(), packed.labels[0].tolist()
    start = packed.position_ids[0].tolist().index(0, 1)  # where the second example begins
    assert row[start: start + len(text_ids) + 1] == [*text_ids, tokenizer.eos_token_id]
    assert labels[start + 1: start + len(text_ids) + 1] == [*text_ids[1:],
                                                            tokenizer.eos_token_id]
