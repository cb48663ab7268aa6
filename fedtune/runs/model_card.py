"""The model card (``README.md``) written beside an exported adapter, as the Hub expects:
what the adapter is for (its exact base), how it was trained, on what, and at what
privacy cost, so the folder can be published or reloaded without the run directory."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from fedtune.config import Scenario, parse_tiny_seed
from fedtune.model.sources import BUNDLED_GGUF, BUNDLED_HUB_ID, BUNDLED_PIN
from fedtune.runs.report import scenario_toml

MODEL_CARD = "README.md"


def _lent_prefix() -> str:
    from fedtune.model.loading import LENT_PREFIX

    return LENT_PREFIX


def base_description(source: str, quantization: str, dtype: str) -> str:
    """The base exactly as fedtune loaded it: for "smollm2" that is not the Hub's
    weights but the bundled Q4_1 GGUF, dequantized."""
    source = source.strip()
    if source == "smollm2":
        where = (f"`{BUNDLED_HUB_ID}` as the **Q4_1 GGUF** `{BUNDLED_GGUF}` bundled in the "
                 f"Python package `{BUNDLED_PIN}`, dequantized to float32 by transformers' GGUF "
                 f"loader (its weights are the Q4_1 values, not the Hub's original ones)")
    elif parse_tiny_seed(source) is not None:
        where = f"fedtune's tiny random test model `{source}` (built from its seed, not a download)"
    elif source.startswith(_lent_prefix()):
        where = "a model an application lent to fedtune in memory (not reproducible from here)"
    else:
        where = f"`{source}` (a local path or Hugging Face Hub id, loaded with transformers)"
    quant = {"none": "none (full precision)",
             "8bit": "8bit (bitsandbytes LLM.int8, applied when loading the base above)",
             "4bit": "4bit (bitsandbytes NF4 with double quantization, applied when loading "
                     "the base above)"}.get(quantization, quantization)
    return f"- Base model: {where}\n- Quantization while training: {quant}; dtype {dtype}"


def _command() -> str:
    """This process's command line, as the user typed it where it is fedtune's CLI."""
    argv = list(sys.argv) or [""]
    if Path(argv[0]).name == "fedtune":
        return shlex.join(["fedtune", *argv[1:]])
    return shlex.join(["python", *argv])


def _data_summary(scenario: Scenario) -> str:
    d = scenario.data
    parts = [f"source `{d.source}`"]
    if d.path:
        parts.append(f"path `{d.path}`")
    parts += [f"{d.num_clients} clients", f"partition `{d.partition}`", f"seq_len {d.seq_len}",
              f"held-out fraction {d.eval_fraction:g}"]
    if d.chat_template:
        parts.append(f"chat template `{d.chat_template}`, assistant-only loss "
                     f"{str(d.assistant_only_loss).lower()}")
    return ", ".join(parts)


def _privacy_line(privacy: dict[str, Any] | None) -> str:
    if not privacy:
        return "- Differential privacy: none"
    epsilon = privacy.get("epsilon")
    spent = f"epsilon = {epsilon:.4g}" if isinstance(epsilon, (int, float)) else \
        "epsilon: not accounted on the server in this mode (each client's is in summary.json)"
    return (f"- Differential privacy: mode `{privacy.get('mode')}`, {spent}, "
            f"delta = {privacy.get('delta')}, accountant `{privacy.get('accountant')}`")


def model_card(scenario: Scenario, rounds_done: int, privacy: dict[str, Any] | None) -> str:
    """The card's Markdown, front matter included (``library_name: peft``, ``base_model``)."""
    m, lora, fed = scenario.model, scenario.lora, scenario.federation
    hub_base = BUNDLED_HUB_ID if m.source.strip() == "smollm2" else m.source.strip()
    per_round = fed.clients_per_round or scenario.data.num_clients
    return "\n".join([
        "---",
        "library_name: peft",
        f"base_model: {hub_base}",
        "tags: [fedtune, lora, federated-learning]",
        "---",
        "",
        f"# LoRA adapter trained with fedtune ({fed.aggregator})",
        "",
        base_description(m.source, m.quantization, m.dtype),
        f"- Method: federated LoRA, aggregator `{fed.aggregator}`; r = {lora.rank}, "
        f"lora_alpha = {lora.alpha:g} (the factors are stored at this scale, alpha / r = "
        f"{lora.scale:g}), target modules {', '.join(lora.target_modules)}",
        f"- Rounds: {rounds_done} of {scenario.run.rounds}; clients: {scenario.data.num_clients}"
        f" ({per_round} per round); local steps {scenario.train.steps}, lr {scenario.train.lr:g}",
        f"- Data: {_data_summary(scenario)}",
        _privacy_line(privacy),
        f"- Seed: {scenario.run.seed}",
        "",
        "## How it was produced",
        "",
        f"Written by the process `{_command()}`. To reproduce it, save the scenario below "
        "as `scenario.toml` and run `fedtune simulate -s scenario.toml` (a simulation) or "
        "`fedtune server -c scenario.toml` (a deployment, with its clients).",
        "",
        "```toml",
        scenario_toml(scenario.to_dict()).rstrip(),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base, 'THIS_FOLDER')  # base loaded as above",
        "```",
        "",
    ])
