"""The run report: a self-contained HTML page with the plots the run has data for."""

from __future__ import annotations

import base64
import re

from fedtune.config import load_scenario
from fedtune.runs.report import render_report
from fedtune.runs.rundir import write_report


def _summary(with_dp: bool) -> dict:
    rounds = []
    for r in (1, 2, 3):
        record = {"round": r, "train_loss": 5.0 - r / 10, "eval_loss": 5.0 - r / 8,
                  "eval_perplexity": 150.0 - 10 * r, "clients_sampled": 10,
                  "clients_replied": 8, "dropouts": 1, "stragglers": 1,
                  "bytes_up": 2**20 * r, "bytes_down": 2**21, "seconds": 3.5}
        if with_dp:
            record["epsilon"] = 0.5 * r
        rounds.append(record)
    return {"status": "completed", "scenario": load_scenario("tiny").to_dict(),
            "initial": {"eval_loss": 5.1, "eval_perplexity": 164.0}, "rounds": rounds,
            "final": {"eval_perplexity": 120.0}, "totals": {"bytes_up": 6 * 2**20,
                                                             "bytes_down": 6 * 2**20}}


def test_report_embeds_png_plots_and_the_scenario(tmp_path) -> None:
    path = write_report(tmp_path, _summary(with_dp=True))
    page = path.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4  # perplexity, bytes, epsilon, participation
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "Privacy spent (epsilon) per round" in page
    assert "164.00 → 120.00" in page
    assert '[lora]\nrank = 4' in page  # the scenario, readable TOML
    assert "<td>140.00</td>" in page and "<td>2.00</td>" in page  # table: ppl, down MB


def test_report_without_dp_has_no_epsilon_plot() -> None:
    page = render_report(_summary(with_dp=False))
    assert page.count("<img") == 3 and "epsilon) per round" not in page


def test_round_axes_tick_whole_rounds_only():
    """Three rounds on matplotlib's default locator get ticks at 0.5, 1.5, ...; a round
    axis must not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedtune.runs.report import round_axis

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2, 3], [4.0, 3.0, 2.5, 2.4])
    fig.canvas.draw()
    assert any(t != int(t) for t in ax.get_xticks())  # the default this guards against
    round_axis(ax)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 0 <= t <= 3]
    plt.close(fig)
    assert ticks and all(t == int(t) for t in ticks)


def test_the_report_says_which_tokens_the_perplexity_is_over() -> None:
    summary = _summary(with_dp=False)
    assert "over the" not in render_report(summary)  # a run from before the key: nothing
    summary["eval_tokens"] = "assistant"
    assert "164.00 → 120.00 (over the assistant's tokens)" in render_report(summary)
    summary["eval_tokens"] = "all"
    assert "164.00 → 120.00 (over every token)" in render_report(summary)
