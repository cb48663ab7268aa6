"""One record type for every data format: plain text, or a conversation of messages.

The formats people bring (``{"text"}``, ``{"prompt", "response"}``, the Hugging Face chat
format ``{"messages": [{"role", "content"}, ...]}`` and Alpaca's ``{"instruction",
"input", "output"}``) all parse to a ``str`` or a ``Conversation``, so everything after
parsing (splitting, tokenising, masking) knows one shape. Errors name the field; the
JSONL reader adds the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtune.data.types import DataError

ROLES = ("system", "user", "assistant")
RECORD_SHAPES = ('{"text": str}, {"prompt": str, "response": str}, '
                 '{"messages": [{"role": str, "content": str}, ...]} or '
                 '{"instruction": str, "input": str (optional), "output": str}')


@dataclass(frozen=True)
class Conversation:
    """Messages as (role, content) pairs; hashable, so cached data can hold it."""

    messages: tuple[tuple[str, str], ...]

    @property
    def text(self) -> str:
        """The turns joined by newlines: a prompt/response pair gives "prompt\\nresponse",
        the plain text that fedtune trained on before chat templates."""
        return "\n".join(content for _, content in self.messages)

    def as_dicts(self) -> list[dict[str, str]]:
        """The messages as ``apply_chat_template`` takes them."""
        return [{"role": role, "content": content} for role, content in self.messages]


Record = str | Conversation


def as_text(record: Record) -> str:
    """A record as plain text (a conversation's turns joined by newlines)."""
    return record.text if isinstance(record, Conversation) else record


def parse_record(record: Any) -> Record:
    """The record of one JSON object in any of the accepted shapes."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "text" in record:
        return string_field(record, "text")
    if "messages" in record:
        return _messages(record["messages"])
    if "instruction" in record or "output" in record:
        return _alpaca(record)
    if "prompt" in record and "response" in record:
        return Conversation((("user", string_field(record, "prompt")),
                             ("assistant", string_field(record, "response"))))
    raise DataError(f"record has none of the shapes {RECORD_SHAPES}; keys: {sorted(record)}")


def string_field(record: dict[str, Any], key: str) -> str:
    """A field that must hold a non-empty string."""
    if key not in record:
        raise DataError(f"field {key!r} is missing")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"field {key!r} must be a non-empty string, got {value!r:.60}")
    return value


def _alpaca(record: dict[str, Any]) -> Conversation:
    """Instruction (and its optional input, after a blank line) as the user's turn."""
    prompt = string_field(record, "instruction")
    extra = record.get("input", "")
    if not isinstance(extra, str):
        raise DataError(f"field 'input' must be a string, got {extra!r:.60}")
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    return Conversation((("user", prompt), ("assistant", string_field(record, "output"))))


def _messages(value: Any) -> Conversation:
    """The chat format's list of {"role", "content"} objects."""
    if not isinstance(value, list) or not value:
        raise DataError(f"field 'messages' must be a non-empty list, got {value!r:.60}")
    messages = []
    for number, message in enumerate(value):
        where = f"messages[{number}]"
        if not isinstance(message, dict):
            raise DataError(f"field {where} must be an object, got {message!r:.60}")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"field {where}.role must be one of {', '.join(ROLES)}, "
                            f"got {role!r:.40}")
        try:
            content = string_field(message, "content")
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        messages.append((role, content))
    if not any(role == "assistant" for role, _ in messages):
        raise DataError("field 'messages' has no assistant message (nothing to learn)")
    return Conversation(tuple(messages))
