"""Replies to look at: a few held-out prompts answered by the base and by the final
federated adapter, side by side (``generations.json`` in the run directory, a table in
report.html, one pair printed by ``fedtune simulate``).

Deterministic: the prompts are the first held-out record of clients drawn from the seed
tree's ``generations`` stream, and decoding is greedy (no sampling; the torch seed is set
from the same stream only so that nothing else can make two runs differ). Cheap: the
model is the process's cached base (``fedtune.model.cache``, already loaded after an
in-process run), the final adapter is installed on it once as the frozen global adapter
(the same way the federation's evaluation applies it), and each side answers all prompts
in one batched ``generate`` of ``report.max_new_tokens`` tokens.

A prompt is what the record's author wrote before the reply to be predicted:

- a conversational record (messages): every turn before the last assistant turn,
  rendered with the scenario's chat template (``data.chat_template``, as in training)
  and ``add_generation_prompt=True``; without a template, those turns as the plain text
  they were trained as (one line each);
- a plain text: its first line, newline included (a prompt / response pair is joined
  by a newline, so this is the prompt); a one-line text: the first half of its tokens.

The model sees at most the prompt's last ``data.seq_len`` tokens (what it trained on);
the report and the terminal show a conversation's turns as "role: content" lines, not
the template's markup.

Privacy: the prompts are records of the clients' held-out sets, which in a simulation
are the operator's own data (the simulation holds every client's data); showing them
releases nothing new. Under DP the adapter side is the released adapter, and replies
computed from it are post-processing (no privacy cost). A deployed server holds no
client data, so only simulations generate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fedtune.config import Scenario
from fedtune.core.files import atomic_file
from fedtune.core.seeds import stream
from fedtune.runs.report import printable
from fedtune.runs.rundir import ADAPTER_DIR, GENERATIONS_FILE, SUMMARY_FILE, write_report

log = logging.getLogger("fedtune")


@dataclass(frozen=True)
class Generation:
    """One held-out prompt (as people read it, see ``Prompt``) and the two greedy
    replies to it."""

    client: str
    prompt: str
    base: str
    adapter: str


# ---- prompts ------------------------------------------------------------------------
def _turns(record: Any) -> list[dict[str, str]] | None:
    """The messages of a conversational record (a ``fedtune.data.records.Conversation``,
    ``{"messages": [...]}`` or a list of turns) as role / content dicts; None for text."""
    if isinstance(record, str):
        return None
    if hasattr(record, "as_dicts"):
        return list(record.as_dicts())
    turns = record.get("messages") if isinstance(record, Mapping) else record
    if isinstance(turns, Sequence) and turns and all(isinstance(t, Mapping) for t in turns):
        return [{"role": str(t["role"]), "content": str(t["content"])} for t in turns]
    raise ValueError(f"a held-out record is neither text nor messages: {record!r:.80}")


def _before_last_reply(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """The turns before the last assistant turn (all of them when none answers)."""
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"),
               default=len(turns))
    return turns[:last]


def _text_prompt(text: str, tokenizer: Any) -> str:
    """A plain record's first line (with its newline), or a one-liner's first half."""
    head, newline, rest = text.partition("\n")
    if newline and head.strip() and rest.strip():
        return head + newline
    ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
    return str(tokenizer.decode(ids[: max(1, len(ids) // 2)]))


class Prompt(NamedTuple):
    """A held-out prompt as people read it (``shown``: a conversation's turns as
    "role: content" lines) and as the model gets it (``text``: through the template)."""

    shown: str
    text: str


def prompt_of(record: Any, tokenizer: Any, template: str = "") -> Prompt:
    """The prompt of one held-out record (module docstring: which part and why).
    ``template``: the Jinja chat template conversations were trained with; without one
    they were trained as plain text, their turns joined by newlines."""
    turns = _turns(record)
    if turns is None:
        text = _text_prompt(record, tokenizer)
        return Prompt(text, text)
    before = _before_last_reply(turns)
    shown = "\n".join(f"{t['role']}: {t['content']}" for t in before)
    if not template:
        return Prompt(shown, "".join(t["content"] + "\n" for t in before))
    return Prompt(shown, str(tokenizer.apply_chat_template(
        before, chat_template=template, tokenize=False, add_generation_prompt=True)))


def _template(scenario: Scenario, tokenizer: Any) -> str:
    """The Jinja source of the scenario's ``data.chat_template`` ("" when none)."""
    name = scenario.data.chat_template
    if not name:
        return ""
    from fedtune.data.chat import resolve_template

    return resolve_template(name, tokenizer)


def held_out_prompts(scenario: Scenario, tokenizer: Any, count: int
                     ) -> list[tuple[str, Prompt]]:
    """(client id, prompt) for ``count`` held-out records: the first record of clients in
    a seeded order, then their second records, and so on."""
    from fedtune.data import clients_of

    clients = [c for c in clients_of(scenario.data, scenario.run.seed)
               [: scenario.data.num_clients] if c.eval]
    order = stream(scenario.run.seed, "generations").sample(clients, len(clients))
    picked: list[tuple[str, Any]] = []
    depth = 0
    while len(picked) < count and any(depth < len(c.eval) for c in order):
        picked += [(c.client_id, c.eval[depth]) for c in order if depth < len(c.eval)]
        depth += 1
    template = _template(scenario, tokenizer)
    return [(client, prompt_of(record, tokenizer, template))
            for client, record in picked[:count]]


# ---- replies ------------------------------------------------------------------------
def _left_padded(prompts: list[str], tokenizer: Any, max_tokens: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of the prompts, padded on the left (so every reply
    starts at the same column), each cut to its last ``max_tokens`` tokens."""
    from fedtune.data.tokenize import pad_id_of

    encoded = [ids[-max_tokens:] for ids in
               tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    width = max(len(ids) for ids in encoded)
    pad = pad_id_of(tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    return input_ids, mask


@torch.no_grad()
def greedy_replies(model: torch.nn.Module, tokenizer: Any, prompts: list[str],
                   max_new_tokens: int, max_prompt_tokens: int) -> list[str]:
    """Each prompt's greedy continuation of at most ``max_new_tokens`` tokens, decoded
    without special tokens; the model's train / eval mode is restored afterwards."""
    from fedtune.data.tokenize import pad_id_of

    input_ids, mask = _left_padded(prompts, tokenizer, max_prompt_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             temperature=None, top_p=None, top_k=None,
                             pad_token_id=pad_id_of(tokenizer))
    finally:
        model.train(was_training)
    new = out[:, input_ids.shape[1]:].cpu()
    return [str(tokenizer.decode(row, skip_special_tokens=True)) for row in new]


def _adapter_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final adapter's tensors, its peft scales folded in (the update is B @ A)."""
    from fedtune.model.lora import exported_update

    return exported_update(Path(run_dir) / ADAPTER_DIR)


def generate(scenario: Scenario, run_dir: Path) -> list[Generation]:
    """Base and adapter replies to ``report.generations`` held-out prompts."""
    from fedtune.model.lora import GLOBAL_ADAPTER, load_frozen_global
    from fedtune.train.session import Trainee

    spec = scenario.report
    model, tokenizer = Trainee.of(scenario).cached_model()  # the run's cached base
    chosen = held_out_prompts(scenario, tokenizer, spec.generations)
    if not chosen:
        return []
    prompts = [prompt.text for _, prompt in chosen]
    reply = {"max_new_tokens": spec.max_new_tokens,
             "max_prompt_tokens": scenario.data.seq_len}
    active = list(model.active_adapters)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream(scenario.run.seed, "generations").getrandbits(63))
        with model.disable_adapter():
            base = greedy_replies(model, tokenizer, prompts, **reply)
        load_frozen_global(model, _adapter_state(run_dir), scenario.lora)
        model.base_model.set_adapter([GLOBAL_ADAPTER])
        try:
            tuned = greedy_replies(model, tokenizer, prompts, **reply)
        finally:
            model.base_model.set_adapter(active)
    return [Generation(client, prompt.shown, b, a)
            for (client, prompt), b, a in zip(chosen, base, tuned, strict=True)]


def write_generations(scenario: Scenario, run_dir: Path) -> list[Generation]:
    """After a completed run: ``generations.json`` and a report.html that shows it.
    Nothing when ``report.generations`` is 0 or the run left no adapter; a failure is
    logged, never raised (the run itself succeeded)."""
    run_dir = Path(run_dir)
    if scenario.report.generations == 0 or not (run_dir / ADAPTER_DIR).is_dir():
        return []
    try:
        pairs = generate(scenario, run_dir)
        with atomic_file(run_dir / GENERATIONS_FILE) as handle:
            json.dump([asdict(p) for p in pairs], handle, indent=2)
        write_report(run_dir, json.loads((run_dir / SUMMARY_FILE).read_text()))
    except Exception as err:  # noqa: BLE001 - replies to look at never fail a finished run
        log.warning("fedtune: could not generate the held-out replies: %s", err)
        return []
    return pairs


def _one_line(text: str, limit: int) -> str:
    """``text`` on one line (newlines shown as ⏎, other control characters as U+FFFD),
    cut to ``limit`` characters."""
    flat = printable(text.strip().replace("\n", " ⏎ "), keep="")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def pair_lines(pair: Generation, limit: int = 160) -> list[str]:
    """A pair for a terminal: the prompt, then the two replies, each on one short line."""
    return [f"held-out prompt ({pair.client}): {_one_line(pair.prompt, limit)}",
            f"  base model:        {_one_line(pair.base, limit)}",
            f"  federated adapter: {_one_line(pair.adapter, limit)}"]


def read_generations(run_dir: Path) -> list[Generation]:
    """The pairs a run directory holds (none when generation was off or failed)."""
    path = Path(run_dir) / GENERATIONS_FILE
    if not path.is_file():
        return []
    return [Generation(**item) for item in json.loads(path.read_text())]
