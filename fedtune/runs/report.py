"""The run report: one self-contained HTML page in the run directory.

Plots (held-out perplexity, traffic, epsilon when DP is on, participation with
dropouts and stragglers) are PNGs embedded as data URIs, so the file can be mailed or
attached to a paper's supplement and opened anywhere; a simulation's page also shows a few
held-out prompts with the base's and the adapter's replies; the scenario that produced
the run is printed as TOML at the bottom, so the page is also a recipe.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

REPORT_FILE = "report.html"
MB = 2**20


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 3.6))


def round_axis(ax: Any) -> None:
    """Rounds are whole numbers: no tick at round 1.5."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _embed(fig: Any, title: str, ylabel: str) -> str:
    import matplotlib.pyplot as plt

    ax = fig.axes[0]
    ax.set_title(title)
    round_axis(ax)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"></figure>'


def perplexity_plot(summary: dict[str, Any]) -> str | None:
    points = [(0, summary["initial"]["eval_perplexity"])] if summary.get("initial") else []
    points += [(r["round"], r["eval_perplexity"]) for r in summary["rounds"]
               if r.get("eval_perplexity") is not None]
    if not points:
        return None
    fig, ax = _figure()
    ax.plot(*zip(*points, strict=True), marker="o", label="held-out perplexity")
    return _embed(fig, "Held-out perplexity per round (round 0: before training)",
                  "perplexity")


def _bar_pair(ax: Any, rounds: list[dict[str, Any]], left: tuple[str, str],
              right: tuple[str, str], width: float, scale: float = 1.0) -> None:
    """Two bars per round side by side: (record key, label) each, values / ``scale``."""
    x = [r["round"] for r in rounds]
    for shift, (key, label) in ((-width / 2, left), (width / 2, right)):
        ax.bar([v + shift for v in x], [(r.get(key) or 0) / scale for r in rounds], width,
               label=label)


def traffic_plot(summary: dict[str, Any]) -> str | None:
    rounds = summary["rounds"]
    if not any(r.get("bytes_up") is not None for r in rounds):  # none, or withheld (DP)
        return None
    fig, ax = _figure()
    _bar_pair(ax, rounds, ("bytes_up", "up (clients to server)"),
              ("bytes_down", "down (server to clients)"), 0.4, MB)
    return _embed(fig, "Bytes per round", "MB")


def epsilon_plot(summary: dict[str, Any]) -> str | None:
    points = [(r["round"], r["epsilon"]) for r in summary["rounds"]
              if r.get("epsilon") is not None]
    client = [(r["round"], r["sample_epsilon_max"]) for r in summary["rounds"]
              if r.get("sample_epsilon_max") is not None]
    if not points and not client:
        return None
    fig, ax = _figure()
    if points:
        ax.plot(*zip(*points, strict=True), marker="o", label="client-level epsilon")
    if client:
        ax.plot(*zip(*client, strict=True), marker="s", label="DP-SGD epsilon (max client)")
    return _embed(fig, "Privacy spent (epsilon) per round", "epsilon")


def participation_plot(summary: dict[str, Any]) -> str | None:
    rounds = summary["rounds"]
    if not rounds:
        return None
    fig, ax = _figure()
    x = [r["round"] for r in rounds]
    ax.plot(x, [r.get("clients_sampled", 0) for r in rounds], marker="o", label="sampled")
    ax.plot(x, [r.get("clients_replied", 0) for r in rounds], marker="s", label="aggregated")
    _bar_pair(ax, rounds, ("dropouts", "dropped out"), ("stragglers", "stragglers"), 0.3)
    return _embed(fig, "Participation per round", "clients")


COLUMNS = (("round", "round", "{}"), ("train loss", "train_loss", "{:.4f}"),
           ("held-out ppl", "eval_perplexity", "{:.2f}"), ("sampled", "clients_sampled", "{}"),
           ("aggregated", "clients_replied", "{}"), ("dropped out", "dropouts", "{}"),
           ("stragglers", "stragglers", "{}"), ("up MB", "bytes_up", "mb"),
           ("down MB", "bytes_down", "mb"), ("epsilon", "epsilon", "{:.3g}"),
           ("seconds", "seconds", "{:.1f}"))


def _cell(record: dict[str, Any], key: str, form: str) -> str:
    value = record.get(key)
    if value is None:
        return "–"
    return f"{value / MB:.2f}" if form == "mb" else form.format(value)


def rounds_table(summary: dict[str, Any]) -> str:
    head = "".join(f"<th>{name}</th>" for name, _, _ in COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{_cell(r, key, form)}</td>" for _, key, form
                                    in COLUMNS) + "</tr>" for r in summary["rounds"])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def scenario_toml(scenario: dict[str, Any]) -> str:
    import tomli_w

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if v is not None}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value if v is not None]
        return value

    return tomli_w.dumps(plain(scenario))


def printable(text: str, keep: str = "\n\t") -> str:
    """``text`` with control characters (but those in ``keep``) shown as U+FFFD: a
    model's reply may hold any byte, and a terminal or a page must not act on it."""
    return "".join(c if c.isprintable() or c in keep else "\ufffd" for c in text)


def _text_cell(text: Any) -> str:
    return f"<td>{html.escape(printable(str(text)))}</td>"


def generations_table(pairs: list[dict[str, Any]]) -> str:
    """Held-out prompts with the base's and the federated adapter's replies (see
    ``fedtune.runs.generations``); every text is data, so every text is escaped."""
    if not pairs:
        return ""
    rows = "".join("<tr>" + "".join(_text_cell(p.get(key, "")) for key in
                                    ("prompt", "base", "adapter")) + "</tr>" for p in pairs)
    return ("<h2>Replies to held-out prompts</h2><p>Greedy decoding, the same prompts for "
            "both; the base model without the adapter, then with the final federated "
            "adapter.</p><table class='text'><thead><tr><th>held-out prompt</th>"
            f"<th>base model</th><th>federated adapter</th></tr></thead><tbody>{rows}"
            "</tbody></table>")


STYLE = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}
figure{display:inline-block;margin:0.5em}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}pre{background:#f6f6f6;
padding:1em;overflow:auto}table.text td{text-align:left;vertical-align:top;
white-space:pre-wrap;width:33%}"""


def _over_tokens(summary: dict[str, Any]) -> str:
    """Which tokens the perplexity is over (summary.json's ``eval_tokens``): a chat run's
    is over the assistant's replies only, not comparable with one over every token."""
    tokens = summary.get("eval_tokens")
    return {"assistant": " (over the assistant's tokens)",
            "all": " (over every token)"}.get(tokens, "")


def render_report(summary: dict[str, Any], generations: list[dict[str, Any]] | None = None
                  ) -> str:
    """The page; ``generations``: the run's held-out replies (generations.json's items)."""
    scenario = summary["scenario"]
    name = scenario.get("run", {}).get("name", "fedtune")
    final, initial = summary.get("final", {}), summary.get("initial", {})
    plots = [p for p in (perplexity_plot(summary), traffic_plot(summary),
                         epsilon_plot(summary), participation_plot(summary)) if p]
    totals = summary.get("totals", {})
    facts = [
        f"status <b>{html.escape(str(summary.get('status')))}</b>"
        + (f" ({html.escape(summary['error'])})" if summary.get("error") else ""),
        f"{len(summary['rounds'])} of {scenario.get('run', {}).get('rounds', '?')} rounds",
        f"{scenario.get('data', {}).get('num_clients', '?')} clients "
        f"({html.escape(str(scenario.get('data', {}).get('partition', 'natural')))} partition)",
        f"aggregator {html.escape(str(scenario.get('federation', {}).get('aggregator')))}",
    ]
    if initial.get("eval_perplexity") is not None and final.get("eval_perplexity") is not None:
        facts.append(f"held-out perplexity {initial['eval_perplexity']:.2f} → "
                     f"{final['eval_perplexity']:.2f}{_over_tokens(summary)}")
    if totals.get("bytes_up") is not None:  # client-level DP withholds traffic
        facts.append(f"traffic {totals.get('bytes_up', 0) / MB:.2f} MB up, "
                     f"{totals.get('bytes_down', 0) / MB:.2f} MB down")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>fedtune run "
            f"{html.escape(name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>fedtune run: {html.escape(name)}</h1><p>{' · '.join(facts)}</p>"
            f"{''.join(plots)}<h2>Rounds</h2>{rounds_table(summary)}"
            f"{generations_table(generations or [])}"
            f"<h2>Scenario</h2><pre>{html.escape(scenario_toml(scenario), quote=False)}</pre>"
            f"</body></html>")

