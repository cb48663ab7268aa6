"""`fedtune` command line: simulate, plan, list, compare, server, client, keys, certs, export.

Only typer and rich are imported here: each command imports what it needs when it runs,
so ``fedtune --help``, ``-h`` and ``--version`` (and a typo) answer without loading torch
(about 2 s of imports; benchmarks/RESULTS.md, "fedtune --help").
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fedtune import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Federated fine-tuning of language models with quantized LoRA adapters.")
# soft_wrap: never break a message into lines (tools and tests read them whole)
console = Console(stderr=True, soft_wrap=True)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def round_line(record: dict[str, Any], rounds: int) -> str:
    """One human line per round for the progress display."""
    eval_loss, train_loss = record.get("eval_loss"), record.get("train_loss")
    held_out = "n/a" if eval_loss is None else f"{eval_loss:.4f}"
    trained = "n/a" if train_loss is None else f"{train_loss:.4f}"  # none under DP
    if record["round"] == 0:
        return f"[bold]round 0/{rounds}[/] (before training)  held-out loss {held_out}"
    dropped = f"  dropped {len(record['dropped'])}" if record.get("dropped") else ""
    if record.get("epsilon") is not None:
        dropped += f"  epsilon {record['epsilon']:.3g} (delta {record['delta']:g})"
    if record.get("sample_epsilon_max") is not None:
        dropped += f"  DP-SGD epsilon <= {record['sample_epsilon_max']:.3g}"
    if record.get("clients_dropped"):  # client-level DP publishes the count only
        dropped = f"  dropped {record['clients_dropped']}" + dropped
    traffic = ""  # client-level DP withholds bytes and durations
    if record.get("bytes_up") is not None:
        traffic = (f"  up {_fmt_bytes(record['bytes_up'])}  "
                   f"down {_fmt_bytes(record['bytes_down'])}")
    if record.get("seconds") is not None:
        traffic += f"  {record['seconds']:.1f} s"
    return (
        f"[bold]round {record['round']}/{rounds}[/]  train loss {trained}  "
        f"held-out loss {held_out}  clients {record['clients_replied']}/"
        f"{record['clients_sampled']}{dropped}{traffic}"
    )


def reply_line(progress: Any, rounds: int) -> str:
    """One line on a round in progress (a ``fedtune.flower.rounds.ReplyProgress``)."""
    doing = "training" if progress.phase == "train" else "evaluating"
    return (f"round {progress.round}/{rounds}: {progress.finished}/{progress.sampled} "
            f"clients finished {doing}")


def throttled(show: Callable[[Any], None], every: float = 1.0,
              clock: Callable[[], float] = time.monotonic) -> Callable[[Any], None]:
    """``show`` a ReplyProgress at most once per ``every`` seconds, except that the last
    reply of a phase is always shown (a round of many clients stays readable)."""
    last = -math.inf

    def maybe(progress: Any) -> None:
        nonlocal last
        now = clock()
        if progress.finished == progress.sampled or now - last >= every:
            last = now
            show(progress)

    return maybe


@contextlib.contextmanager
def _exits_on(*failures: type[BaseException]) -> Iterator[None]:
    """A configuration error exits 2, one of ``failures`` exits 1, each with its message."""
    from fedtune.config import ConfigError

    try:
        yield
    except ConfigError as err:
        console.print(f"[red]configuration error:[/] {escape(str(err))}")
        raise typer.Exit(2) from None
    except failures as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        raise typer.Exit(1) from None


@app.command()
def simulate(
    scenario: Optional[str] = typer.Option(  # noqa: UP045 - typer needs Optional here
        None, "--scenario", "-s",
        help="Scenario TOML file or bundled name (default: simulations/default.toml).",
    ),
    overrides: list[str] = typer.Option(  # noqa: B006
        [], "--set", help="Override a scenario key: section.key=value (repeatable)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Parent folder for the run directory."),  # noqa: UP045
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's own logs."),
    resume: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--resume", help="Continue the run in this run directory from its checkpoint "
        "(after Ctrl-C or SIGTERM)."),
) -> None:
    """Run a federated fine-tuning simulation with virtual clients on this machine
    (Ctrl-C or SIGTERM stop it and say how to resume)."""
    from fedtune.config import ConfigError
    from fedtune.runs.simulate import SimulationError, SimulationInterrupted, simulation_start
    from fedtune.runs.simulate import simulate as run

    with _exits_on(SimulationError):
        chosen = simulation_start(scenario, overrides, resume, out)
    rounds = chosen.run.rounds
    from fedtune.runs.cluster import resolve_address

    address = resolve_address(chosen.simulation.ray_address)
    console.print(
        f"fedtune: [bold]{escape(chosen.run.name)}[/] — model {escape(chosen.model.source)} "
        f"({chosen.model.quantization}), {chosen.data.num_clients} clients "
        f"({chosen.data.source}), {rounds} rounds, aggregator {chosen.federation.aggregator}"
        + ("" if address is None else f", on the Ray cluster at {escape(address)}")
        + (f", resuming {escape(str(resume))}" if resume else "")
    )
    with console.status("starting the simulation engine and loading the model...") as status:
        def progress(record: dict[str, Any]) -> None:
            console.print(round_line(record, rounds))
            status.update(f"round {record['round'] + 1}/{rounds} in progress..."
                          if record["round"] < rounds else "finishing the run...")

        def say(text: str) -> None:
            console.print(escape(text))
            status.update(escape(text) + "...")

        replies = throttled(lambda p: console.print(reply_line(p, rounds)))
        try:
            run_dir = run(chosen, out, progress=progress, verbose=verbose, resume=resume,
                          on_replies=replies, say=say)
        except SimulationInterrupted as stopped:
            status.stop()
            _say_how_to_continue(stopped, "simulate", "Ray and its workers have ended",
                                 "start it again")
            from fedtune.runs.lifecycle import exit_at_once

            exit_at_once(stopped.exit_code)
        except (SimulationError, ConfigError, FileNotFoundError, ValueError) as err:
            console.print(f"[red]error:[/] {escape(str(err))}")
            raise typer.Exit(1) from None
    from fedtune.runs.generations import pair_lines, read_generations

    for pair in read_generations(run_dir)[:1]:  # the rest: report.html, generations.json
        for line in pair_lines(pair):
            console.print(line, markup=False, highlight=False)
    console.print(f"[green]done[/]: run directory {escape(str(run_dir))}")
    print(run_dir)


def _say_how_to_continue(stopped: Any, command: str, what_ended: str,
                         start_again: str) -> None:
    """What a stopped run (``fedtune simulate`` or ``fedtune server``) leaves and the
    command that continues it."""
    import shlex

    console.print(f"[yellow]stopped[/]: {escape(str(stopped))}; {what_ended}")
    if getattr(stopped, "completed", False):
        return
    if stopped.rounds_done:
        console.print(f"checkpoint after round {stopped.rounds_done} kept; continue with: "
                      + escape(shlex.join(["fedtune", command, "--resume",
                                           str(stopped.run_dir)])))
    else:
        console.print(f"no round completed (no checkpoint): {start_again}")


@app.command()
def plan(
    scenario: Optional[str] = typer.Option(  # noqa: UP045 - typer needs Optional here
        None, "--scenario", "-s",
        help="Scenario TOML file or bundled name (default: simulations/default.toml).",
    ),
    overrides: list[str] = typer.Option(  # noqa: B006
        [], "--set", help="Override a scenario key: section.key=value (repeatable)."
    ),
    as_json: bool = typer.Option(False, "--json", help="The plan as JSON on stdout."),
) -> None:
    """What `fedtune simulate` would do, without running it.

    Each client's rank, quantization, batch and sequence length, its memory estimate
    against its profile's budget, the data it holds, the bytes of a round each way, the
    planned epsilon under client-level DP, and the device that trains."""
    import json

    from fedtune.config import load_scenario
    from fedtune.planning.run_plan import plan_run

    with _exits_on(ValueError, OSError):
        chosen = load_scenario(scenario, overrides)
        made = plan_run(chosen)
    if as_json:
        print(json.dumps(made.to_dict(), indent=2))
        return
    for line in plan_lines(made):
        print(line)


#: above this many clients, plan prints one line per kind of client, not per client
PLAN_CLIENT_LINES = 24


def plan_lines(made: Any) -> list[str]:
    """A ``fedtune.planning.run_plan.RunPlan`` as lines for a terminal."""
    def size(n: int | None) -> str:
        return "n/a" if n is None else _fmt_bytes(n)

    lines = [f"plan of {made.name!r}: model {made.model}, {len(made.clients)} clients, "
             f"{made.clients_per_round} per round, {made.rounds} rounds, aggregator "
             f"{made.aggregator}",
             f"trains on: {made.device} ({made.device_reason})",
             "client  data (train/eval texts)  profile  rank  alpha  quantization  "
             "batch x seq_len  memory estimate / budget  down  up"]
    def settings(c: Any) -> str:
        budget = ("no budget (no profile)" if c.budget_mb is None else
                  f"{c.budget_mb:,.0f} MB budget, {'fits' if c.fits else 'DOES NOT FIT'}")
        return (f"{c.profile or '-'}  r={c.rank}  alpha={c.alpha:g}  {c.quantization}  "
                f"{c.batch_size} x {c.seq_len}  {c.memory_mb:,.0f} MB on {c.memory_device} "
                f"/ {budget}  {size(c.bytes_down)}  {size(c.bytes_up)}")

    if len(made.clients) <= PLAN_CLIENT_LINES:
        lines += [f"  {c.partition} {c.client}  {c.train_texts}/{c.eval_texts}  {settings(c)}"
                  for c in made.clients]
    else:  # one line per kind of client (a profile, or the scenario's own settings)
        kinds: dict[str, list[Any]] = {}
        for c in made.clients:
            kinds.setdefault(settings(c), []).append(c)
        for line, group in kinds.items():
            texts = sorted(c.train_texts for c in group)
            lines.append(f"  {len(group)} clients  {texts[0]}-{texts[-1]} train texts  {line}")
    down, up = made.round_bytes("down"), made.round_bytes("up")
    if down is not None or up is not None:
        lines.append(f"per round from round 2 (round 1 sends no adapter): down {size(down)}, "
                     f"up {size(up)}, over all {len(made.clients)} clients")
    else:
        lines.append("per round: the sum of the sampled clients' down / up above")
    if made.privacy:
        p = made.privacy
        lines.append(f"client-level DP: noise multiplier {p['noise_multiplier']:.4g}, sample "
                     f"rate {p['sample_rate']:g}, planned epsilon {p['planned_epsilon']:.4g} "
                     f"after {p['rounds']:g} rounds (delta {p['delta']:g})")
    else:
        lines.append("client-level DP: off")
    lines += [f"note: {note}" for note in made.notes]
    return lines


@app.command("list")
def list_bundled() -> None:
    """The bundled scenarios and device profiles, and the aggregators, one line each."""
    from fedtune import resources
    from fedtune.aggregation.registry import aggregator_class, available
    from fedtune.planning.profiles import load_profile

    print("scenarios (fedtune simulate -s NAME, fedtune plan -s NAME):")
    for name in resources.names("scenario"):
        print(f"  {name:<26} {_first_sentence(resources.path('scenario', name).read_text())}")
    print("device profiles (fedtune client --profile NAME, [clients] profiles):")
    for name in resources.names("profile"):
        print(f"  {name:<26} {load_profile(name).description}")
    print("aggregators (federation.aggregator):")
    for name in available():
        module = sys.modules[aggregator_class(name).__module__]
        print(f"  {name:<26} {(module.__doc__ or '').strip().splitlines()[0]}")


def _first_sentence(toml_text: str, limit: int = 100) -> str:
    """The first sentence of a TOML file's leading comment."""
    comment = []
    for line in toml_text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    text = " ".join(comment)
    text = text.split(". ", 1)[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3].rsplit(" ", 1)[0] + "..."


@app.command()
def compare(
    scenario: Optional[str] = typer.Option(  # noqa: UP045 - typer needs Optional here
        None, "--scenario", "-s",
        help="Scenario TOML file or bundled name (default: simulations/default.toml).",
    ),
    aggregators: Optional[str] = typer.Option(  # noqa: UP045
        None, "--aggregators", "-a",
        help="Comma-separated aggregators to compare (default: every available one).",
    ),
    overrides: list[str] = typer.Option(  # noqa: B006
        [], "--set", help="Override a scenario key: section.key=value (repeatable)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Parent folder for the comparison."),  # noqa: UP045
    no_baselines: bool = typer.Option(
        False, "--no-baselines", help="Skip the centralised and local-only baselines."
    ),
) -> None:
    """Run one scenario under several aggregators and baselines with the same seed."""
    import shlex

    from fedtune.aggregation import available
    from fedtune.config import load_scenario
    from fedtune.runs.compare import (
        BASELINES,
        COMPARISON_MD,
        describe_event,
        failed,
        run_comparison,
    )
    from fedtune.runs.simulate import SimulationError

    names = [a.strip() for a in (aggregators or ",".join(available())).split(",") if a.strip()]
    with _exits_on(SimulationError, FileNotFoundError, ValueError):
        chosen = load_scenario(scenario, overrides)
        folder = run_comparison(
            chosen, names, out or chosen.run.out_dir,
            baselines=() if no_baselines else BASELINES,
            progress=lambda event: console.print(describe_event(event), markup=False),
            command=shlex.join(["fedtune", *sys.argv[1:]]),
        )
    print((folder / COMPARISON_MD).read_text())
    print(folder)
    if failed(folder):
        raise typer.Exit(1)


@app.command()
def server(
    config: Optional[str] = typer.Option(  # noqa: UP045
        None, "--config", "-c", help="Server scenario TOML (e.g. server/server.toml)."),
    resume: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--resume", help="Continue the run in this run directory from its checkpoint."),
    overrides: list[str] = typer.Option(  # noqa: B006
        [], "--set", help="Override a scenario key: section.key=value (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Parent folder for the run directory."),  # noqa: UP045
    insecure: bool = typer.Option(
        False, "--insecure",
        help="Run WITHOUT TLS (ignores the certificate files): traffic is not encrypted."),
) -> None:
    """Start the federation server (a Flower SuperLink) and run every round (SIGTERM or
    Ctrl-C stop it and every process it started, and say how to resume)."""
    import os

    from fedtune.config import ConfigError, load_scenario
    from fedtune.core.files import PRIVATE_UMASK
    from fedtune.deploy.server import DeploymentError, ServerStopped, resumed_scenario, serve

    if (config is None) == (resume is None):
        console.print("[red]error:[/] give --config FILE for a new run or --resume RUN_DIR")
        raise typer.Exit(2)
    try:
        if insecure:
            overrides = [*overrides, "server.insecure=true", 'server.ca_cert=""',
                         'server.cert=""', 'server.key=""', 'server.auth_keys=""']
        chosen = (resumed_scenario(resume, overrides) if resume
                  else load_scenario(config, overrides))
    except ConfigError as err:
        console.print(f"[red]configuration error:[/] {escape(str(err))}")
        raise typer.Exit(2) from None
    rounds = chosen.run.rounds
    console.print(f"fedtune server: [bold]{escape(chosen.run.name)}[/] — {rounds} rounds, "
                  f"aggregator {chosen.federation.aggregator}, {chosen.data.num_clients} clients"
                  + (f", resuming {escape(str(resume))}" if resume else ""))
    umask = os.umask(PRIVATE_UMASK)  # the run directory and all in it: this user's only
    try:
        with _exits_on(DeploymentError, OSError, ValueError):
            run_dir = serve(chosen, out, resume=resume,
                            report=lambda record: console.print(round_line(record, rounds)),
                            announce=lambda text: console.print(escape(text)))
    except ServerStopped as stopped:
        _say_how_to_continue(stopped, "server", "every process of the server has ended",
                             "start it again with --config")
        raise typer.Exit(stopped.exit_code) from None
    finally:
        os.umask(umask)
    console.print(f"[green]done[/]: run directory {escape(str(run_dir))}")
    print(run_dir)


@app.command()
def client(
    server_address: str = typer.Option(..., "--server", help="The server's HOST:PORT."),
    data: str = typer.Option(..., "--data", help=(
        "This client's data: a text file, or a *.jsonl of text, prompt/response, chat "
        "messages or Alpaca records.")),
    profile: str = typer.Option(
        "", "--profile", help="Device profile: a bundled name or a .toml path."),
    name: str = typer.Option(
        "", "--name", help="Stable client name (default: the data file's name)."),
    model: str = typer.Option(
        "", "--model", help="This machine's own copy of the federation's base model (a "
        "folder or .gguf); checked against the base before any training."),
    root_certificates: str = typer.Option(
        "", "--root-certificates", help="CA certificate that signed the server's certificate."),
    auth_key: str = typer.Option(
        "", "--auth-key", help="Private key registered with the server (node authentication)."),
    insecure: bool = typer.Option(
        False, "--insecure", help="Connect WITHOUT TLS: traffic is not encrypted."),
    state_dir: str = typer.Option(
        "", "--state-dir", help="Folder for the run pins, Flower's state and log (made 0700; "
        "default: ~/.local/state/fedtune/clients/SERVER/NAME, kept across restarts)."),
    connect_wait: float = typer.Option(
        30.0, "--connect-wait", help="Seconds to keep trying to reach the server at start."),
    reconnect_for: float = typer.Option(
        600.0, "--reconnect-for", help="Seconds to keep trying when the server stops "
        "answering (a restart) before giving up with an error; 0 = forever."),
    min_noise_multiplier: float = typer.Option(
        0.0, "--min-noise-multiplier", help="Refuse to train under client-level DP with a "
        "smaller noise multiplier (or without DP); 0 = no floor. See docs/privacy.md."),
    max_clip_norm: float = typer.Option(
        0.0, "--max-clip-norm", help="Refuse a client-level DP clip norm above this (0 = any)."),
    max_epsilon: float = typer.Option(
        0.0, "--max-epsilon", help="Refuse a run whose declared epsilon is above this, and "
        "the round that would take this client's own epsilon (its rounds, unamplified) past "
        "it (0 = any)."),
    per_message_process: bool = typer.Option(
        False, "--per-message-process",
        help="Flower's default: a fresh ClientApp process (and model load) per message."),
    client_app: str = typer.Option(
        "fedtune.flower.client_app:app", "--app", hidden=True,
        help="module:attribute of the ClientApp to serve (for tests and custom apps)."),
) -> None:
    """Join a federation and train on local data only (runs until stopped: Ctrl-C, SIGTERM)."""
    import os
    import signal
    import threading

    from fedtune.core.files import PRIVATE_UMASK
    from fedtune.deploy.client import ClientError, ClientOptions, run_client
    from fedtune.privacy.floor import PrivacyFloor, PrivacyFloorError

    try:
        floor = PrivacyFloor(min_noise_multiplier, max_clip_norm, max_epsilon)
    except PrivacyFloorError as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        raise typer.Exit(2) from None
    options = ClientOptions(server=server_address, data=data, profile=profile, name=name,
                            root_certificates=root_certificates, insecure=insecure,
                            auth_key=auth_key, state_dir=state_dir, app=client_app,
                            connect_wait=connect_wait, reconnect_for=reconnect_for,
                            long_lived=not per_message_process,
                            model=model, privacy_floor=floor)
    umask = os.umask(PRIVATE_UMASK)  # the state folder (pins, Flower's state, logs)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        served = run_client(options, say=lambda text: console.print(escape(text)), stop=stop)
    except ClientError as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        raise typer.Exit(1) from None
    finally:
        os.umask(umask)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    console.print(f"client stopped after {served} messages")


keys_app = typer.Typer(help="Client keys of a running `fedtune server` (node authentication), "
                        "run on the server machine: add, list, remove.")
app.add_typer(keys_app, name="keys")
RUN_OPTION = typer.Option(..., "--run", help="The run directory the server prints.")


@contextlib.contextmanager
def _running_server(run_dir: Path) -> Iterator[Any]:
    """The Control API endpoint of the server running ``run_dir`` (exit 1 if none), with
    its refusals as error exits."""
    from fedtune.config import ConfigError
    from fedtune.deploy.control import ControlError
    from fedtune.deploy.server import operator_endpoint

    try:
        endpoint = operator_endpoint(run_dir)
    except ConfigError as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        raise typer.Exit(1) from None
    with _exits_on(ControlError, OSError):
        yield endpoint


@keys_app.command("add")
def keys_add(public_keys: Path = typer.Argument(..., help="OpenSSH public key file(s)."),
             run: Path = RUN_OPTION) -> None:
    """Allow the clients holding these keys to join (one key per line)."""
    from fedtune.deploy.control import add_keys_file

    with _running_server(run) as server:
        added = add_keys_file(server.address, public_keys, server.ca_cert)
    console.print(f"registered {len(added)} new key(s): node ids {added}")


@keys_app.command("list")
def keys_list(run: Path = RUN_OPTION) -> None:
    """The client keys the server knows, with their node ids and status."""
    from fedtune.deploy.control import list_node_keys

    with _running_server(run) as server:
        for node in list_node_keys(server.address, server.ca_cert):
            print(f"{node.node_id}\t{node.status}\t{node.public_key}")


@keys_app.command("remove")
def keys_remove(which: str = typer.Argument(..., help="A node id, or a public key file."),
                run: Path = RUN_OPTION) -> None:
    """Take a client's key away: it can no longer join or send."""
    from fedtune.deploy.control import remove_keys

    with _running_server(run) as server:
        removed = remove_keys(server.address, which, server.ca_cert)
    console.print(f"removed node(s) {removed}")


@app.command()
def certs(
    folder: Path = typer.Argument(..., help="Where to write the certificates and keys."),
    hosts: str = typer.Option("localhost,127.0.0.1", "--hosts",
                              help="Comma-separated names / IPs the server certificate covers."),
    clients: int = typer.Option(0, "--clients", help="Client key pairs to make (node auth)."),
) -> None:
    """Make TEST certificates (a CA, a server certificate) and client keys."""
    from fedtune.deploy.certs import make_certificates

    made = make_certificates(folder, [h.strip() for h in hosts.split(",") if h.strip()],
                             clients)
    keys_file = folder / "authorized_clients.pub"
    keys_file.write_text("".join(p.read_text() for p in made.node_public_keys))
    if not clients:
        console.print("no client keys made: a TLS server needs server.auth_keys (or "
                      "server.allow_unauthenticated_clients = true); use --clients N")
    console.print(f"CA {made.ca_cert}, server certificate {made.cert} (key {made.key})"
                  + (f"; {clients} client keys, public ones listed in {keys_file}"
                     if clients else ""))


@app.command()
def export(
    source: Path = typer.Argument(..., help="A run directory or a peft adapter folder."),
    out: Path = typer.Option(..., "--out", help="Folder to write (must not exist or be empty)."),
    merge: bool = typer.Option(
        False, "--merge", help="Fold the adapter into the base: a plain transformers model."),
    model: str = typer.Option(
        "", "--model", help="Base model source for --merge (default: the run's or the "
        "adapter's own)."),
) -> None:
    """Export a run's adapter: as a peft adapter, or merged into a plain model."""
    from fedtune.sdk.results import AdapterNotFoundError, export_adapter

    with _exits_on(AdapterNotFoundError, FileExistsError, OSError, ValueError):
        written = export_adapter(source, out, merge=merge, model=model or None)
    kind = "merged model" if merge else "peft adapter"
    console.print(f"[green]done[/]: {kind} in {escape(str(written))}")


def _show_version(asked: bool) -> None:
    if asked:
        print(f"fedtune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """fedtune command line."""


def main() -> None:
    app(prog_name="fedtune")


if __name__ == "__main__":
    sys.exit(main())
