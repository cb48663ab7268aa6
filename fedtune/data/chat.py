"""Conversations to tokens with a chat template, and labels on the assistant's tokens only.

A conversation is rendered with ``tokenizer.apply_chat_template`` (the base's own
template, fedtune's ChatML when it has none, or one the scenario names) and tokenised as
one string. Which tokens are the assistant's is found by rendering prefixes: the
conversation up to an assistant message with the generation prompt ends where that
message's tokens begin, and the conversation through the message ends where they end.
Comparing token prefixes (not characters) keeps this exact when a template adds text
around a turn, and works with any template, including those without the ``{% generation
%}`` markers that ``return_assistant_tokens_mask`` needs (SmolLM2's has none). Where a
prefix is not a token prefix of the whole (a token merging across the boundary), the
span starts where the two diverge, as TRL's ``SFTTrainer`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.data.records import Conversation, Record, as_text
from fedtune.data.tokenize import (
    IGNORE_INDEX,
    Example,
    PackedData,
    pack,
    pack_examples,
    pack_texts,
    pad_id_of,
)
from fedtune.data.types import DataError

#: fedtune's default template (ChatML, as SmolLM2 and many instruct models use), for a base
#: whose tokenizer has none or when a scenario says ``chat_template = "chatml"``
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def resolve_template(name: str, tokenizer: Any) -> str:
    """The Jinja source a scenario's ``data.chat_template`` names: "base" (the tokenizer's
    own, else ChatML), "chatml", or a path to a ``*.jinja`` file."""
    if name == "base":
        return getattr(tokenizer, "chat_template", None) or CHATML
    if name == "chatml":
        return CHATML
    path = Path(name)
    if path.suffix != ".jinja" or not path.is_file():
        raise DataError(f"data.chat_template = {name!r}: not 'base', 'chatml' or an existing "
                        "*.jinja file")
    return path.read_text(encoding="utf-8")


def _render(tokenizer: Any, template: str, messages: list[dict[str, str]],
            generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix(ids: list[int], other: list[int]) -> int:
    length = 0
    for a, b in zip(ids, other, strict=False):
        if a != b:
            break
        length += 1
    return length


def assistant_spans(conversation: Conversation, tokenizer: Any, template: str
                    ) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's token ids and the [start, end) token span of each assistant
    message (its content and the template's end-of-turn text after it)."""
    messages = conversation.as_dicts()
    ids = _render(tokenizer, template, messages, generation_prompt=False)
    spans = []
    for index, (role, _) in enumerate(conversation.messages):
        if role != "assistant":
            continue
        before = (_render(tokenizer, template, messages[:index], generation_prompt=True)
                  if index else [])
        through = (ids if index == len(messages) - 1
                   else _render(tokenizer, template, messages[: index + 1], False))
        spans.append((_common_prefix(before, ids), _common_prefix(through, ids)))
    return ids, spans


def encode_conversation(conversation: Conversation, tokenizer: Any, template: str,
                        assistant_only: bool) -> Example:
    """Token ids and labels of one rendered conversation; with ``assistant_only`` every
    label outside the assistant spans is ``IGNORE_INDEX``."""
    ids, spans = assistant_spans(conversation, tokenizer, template)
    if not assistant_only:
        return Example(ids, list(ids))
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def encode_text(text: str, tokenizer: Any) -> Example:
    """Plain text stays plain: its tokens and an eos, every one a target."""
    ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], int(tokenizer.eos_token_id)]
    return Example(ids, list(ids))


def encode_records(records: list[Record], tokenizer: Any, template_name: str,
                   assistant_only: bool) -> list[Example]:
    """Every record as one example: conversations through the template, texts plain."""
    template = resolve_template(template_name, tokenizer)
    return [encode_conversation(r, tokenizer, template, assistant_only)
            if isinstance(r, Conversation) else encode_text(r, tokenizer) for r in records]


def pack_records(records: list[Record], tokenizer: Any, seq_len: int, template_name: str = "",
                 assistant_only: bool = True, *, held_out: bool = False) -> PackedData:
    """A client's records as training (or ``held_out``) blocks.

    Without a template (``""``), every record is plain text run together in full blocks
    (held-out: the last block padded), as fedtune did before chat templates, so seeded
    results of such scenarios stay as they were. With one, each record is an example
    packed whole with its boundaries kept (``pack_examples``).
    """
    if not template_name:
        texts = [as_text(r) for r in records]
        if held_out:
            return pack(texts, tokenizer, seq_len, pad_last=True)
        return PackedData.blocks(pack_texts(texts, tokenizer, seq_len))
    examples = encode_records(records, tokenizer, template_name, assistant_only)
    return pack_examples(examples, seq_len, pad_id_of(tokenizer))
