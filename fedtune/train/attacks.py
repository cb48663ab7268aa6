"""Simulated attackers (``[attack]``): what a malicious client does instead of its
honest training, to measure what an aggregator and the influence bound withstand.

Update attacks rewrite the LoRA a client sends, relative to the start it trained from
(the update u = final - start): ``boost`` sends start + lambda u, ``sign_flip`` start - u,
``noise`` start + a random direction of norm ``noise_norm`` (the federation's fixed
bound when 0: the largest update that passes it). The ``backdoor`` attacker trains
honestly, on its own data plus ``poison_copies`` texts in which the trigger phrase is
followed by the target reply, so that the global model learns to answer the trigger
with the target. Pure functions over state dicts and packed blocks; the ClientApp calls
:func:`poisoned_data` and :func:`attacked_result`, which do nothing for an honest
client.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from fedtune.config import AttackSpec, Scenario
from fedtune.core.seeds import stream
from fedtune.data import PackedData
from fedtune.data.chat import pack_records
from fedtune.data.records import Conversation

State = dict[str, Tensor]


def _start_like(key: str, value: Tensor, start: Mapping[str, Tensor]) -> Tensor:
    """The start of one sent tensor (cut to its shape; zeros for what has none, e.g.
    Fed-SB's R, which starts at 0)."""
    if key not in start:
        return torch.zeros_like(value)
    return start[key][tuple(slice(0, n) for n in value.shape)].to(value.dtype)


def attacked_state(attack: AttackSpec, state: Mapping[str, Tensor],
                   start: Mapping[str, Tensor], noise_norm: float, seed: int) -> State:
    """The state an update attacker sends in place of ``state``."""
    base = {k: _start_like(k, v, start) for k, v in state.items()}
    update = {k: state[k] - base[k] for k in state}
    if attack.kind == "boost":
        moved = {k: attack.boost * u for k, u in update.items()}
    elif attack.kind == "sign_flip":
        moved = {k: -u for k, u in update.items()}
    elif attack.kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        draws = {k: torch.randn(u.shape, generator=gen, dtype=torch.float64)
                 for k, u in sorted(update.items())}
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in draws.values()))
        moved = {k: (d * (noise_norm / norm)).to(update[k].dtype) for k, d in draws.items()}
    else:
        raise ValueError(f"attack.kind = {attack.kind!r} does not rewrite the update")
    return {k: base[k] + moved[k] for k in state}


def backdoor_records(attack: AttackSpec) -> list[Conversation]:
    """The poisoned examples: the trigger as the prompt, the target as the reply (as
    plain text, without a chat template: the trigger's line, then the target's)."""
    example = Conversation((("user", attack.trigger), ("assistant", attack.target)))
    return [example] * attack.poison_copies


@functools.lru_cache(maxsize=8)
def poison_blocks(attack: AttackSpec, source: str, seq_len: int, template: str,
                  assistant_only: bool) -> PackedData:
    """The backdoor texts tokenised and packed as the client's own data is."""
    from fedtune.model.loading import load_tokenizer

    blocks = pack_records(backdoor_records(attack), load_tokenizer(source), seq_len,  # type: ignore[arg-type]
                          template, assistant_only)
    if len(blocks) == 0:
        raise ValueError(f"attack.poison_copies = {attack.poison_copies} backdoor texts do "
                         f"not fill one block of {seq_len} tokens; raise it")
    return blocks


def poisoned_data(scenario: Scenario, partition: int, data: PackedData) -> PackedData:
    """A backdoor attacker's training blocks (its own plus the poisoned ones); anyone
    else's unchanged."""
    attack = scenario.attack
    if attack.kind != "backdoor" or not attack.attacks(partition):
        return data
    d = scenario.data
    return PackedData.cat([data, poison_blocks(attack, scenario.model.source,
                                               int(data.input_ids.shape[1]),
                                               d.chat_template, d.assistant_only_loss)])


def attacked_result(scenario: Scenario, partition: int, result, start: Mapping[str, Tensor],
                    seed: int):  # type: ignore[no-untyped-def]
    """A session's result with an update attacker's upload rewritten (honest clients',
    and a backdoor attacker's, unchanged)."""
    attack = scenario.attack
    if not attack.on_update or not attack.attacks(partition):
        return result
    upload = result.upload
    if upload.state is None:
        raise ValueError("attack: an update attack needs the uncompressed upload")
    noise_norm = attack.noise_norm or scenario.federation.max_update_norm
    noise_seed = stream(scenario.run.seed, "attack", seed).getrandbits(63)
    state = attacked_state(attack, upload.state, start, noise_norm, noise_seed)
    return dataclasses.replace(result, upload=dataclasses.replace(upload, state=state))
