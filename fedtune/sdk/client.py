"""``fedtune.Client``: one device's part in a federation, embedded in an application.

The application gives its data (in memory or a file), optionally its own copy of the
base model and a device profile; ``run(server)`` joins the federation through the same
machinery as ``fedtune client`` (a Flower SuperNode plus the long-lived worker of
``fedtune.deploy``), trains whenever the server asks, and returns when the server says
the run is over, with the final global adapter saved on this device. Nothing but LoRA
factors and scalar metrics leaves it (``fedtune.flower.messages.check_outgoing``).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config import Scenario, load_scenario
from fedtune.privacy.floor import PrivacyFloor
from fedtune.sdk.inputs import check_lendable, client_name, profile_file, texts_from

log = logging.getLogger("fedtune")

#: seconds a client keeps serving after the run's end so its acknowledgement gets out
END_GRACE_S = 5.0


class FederationError(RuntimeError):
    """The client could not join or stay in the federation (unreachable server, refused
    certificate or key, the SuperNode ended); the message says which."""


class Cancelled(Exception):  # noqa: N818 - it is what happened, not an error
    """Raised inside training when the application cancelled the session."""


@dataclass(frozen=True)
class RoundReport:
    """This client's part in one round: its training metrics (all of them: under
    client-level DP the server gets none of those about the data, the device keeps them)."""

    round: int
    metrics: dict[str, float]

    @property
    def train_loss(self) -> float:
        return float(self.metrics["train-loss"])

    @property
    def num_examples(self) -> int:
        return int(self.metrics["num-examples"])


@dataclass(frozen=True)
class Progress:
    """Something the client is doing, for a status line: ``kind`` is "status" (joining,
    leaving), "step" (a local training step) or "evaluate" (the global adapter's held-out
    loss on this device's data)."""

    kind: str
    message: str
    round: int = 0
    step: int = 0
    steps: int = 0
    loss: float | None = None


@dataclass
class FederationResult:
    """How the session ended: "completed" (the server ended the run; ``adapter`` is its
    final global adapter, a peft folder on this device) or "cancelled"."""

    status: str
    rounds: list[RoundReport] = field(default_factory=list)
    adapter: Path | None = None
    last_round: int = 0
    eval_losses: dict[int, float] = field(default_factory=dict)


RoundCallback = Callable[[RoundReport], None]
ProgressCallback = Callable[[Progress], None]

#: one message at a time per process: clients in one process share the cached base model
_ONE_AT_A_TIME = threading.Lock()


def _serially(message: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
    """Flower mod: handle messages one after another across all SDK clients here."""
    with _ONE_AT_A_TIME:
        return call_next(message, context)


def _floor(value: PrivacyFloor | Mapping[str, float] | None) -> PrivacyFloor:
    if isinstance(value, PrivacyFloor):
        return value
    try:
        return PrivacyFloor(**dict(value or {}))
    except TypeError:
        raise ValueError(f"privacy_floor = {value!r}: expected a PrivacyFloor or a dict of "
                         "min_noise_multiplier, max_clip_norm, max_epsilon") from None


class Client:
    """A device that takes part in federated fine-tuning from inside an application.

    ``data``: a list of strings, an iterable of ``{"text"}`` or ``{"prompt", "response"}``
    dicts, or a ``*.jsonl`` / text file. ``model``: None (the federation's base, loaded
    as the server says), a path or model source name, or a loaded transformers model
    (lent for the session and given back without adapters). ``profile``: None (the
    server's settings), a bundled profile name or TOML path, a ``DeviceProfile``, or
    "auto" (this device's free memory; the server's memory estimator picks quantization
    and rank). ``federation``: the federation's scenario (path, bundled name or
    ``Scenario``), to check model compatibility now instead of at the first message.
    ``state_dir``: where the client keeps its name, Flower's state and the adapters it
    receives (default: a new temporary folder). ``privacy_floor``: the weakest
    client-level DP this device trains under, a ``fedtune.privacy.floor.PrivacyFloor`` or
    a dict of its fields (``{"min_noise_multiplier": 1.0}``); a weaker run is refused
    (docs/privacy.md, "What a client enforces").
    """

    def __init__(self, data: object, model: object = None, *, tokenizer: Any = None,
                 profile: object = None, name: str | None = None,
                 state_dir: str | Path | None = None,
                 federation: str | Path | Scenario | None = None,
                 privacy_floor: PrivacyFloor | Mapping[str, float] | None = None) -> None:
        self.texts = texts_from(data)
        self.state_dir = Path(state_dir) if state_dir else Path(
            tempfile.mkdtemp(prefix="fedtune-sdk-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.federation = _scenario(federation)
        self.model, self.tokenizer = _model_choice(model, tokenizer)
        rank = self.federation.lora.rank if self.federation is not None else None
        self.profile = profile_file(profile, self.state_dir, rank)  # type: ignore[arg-type]
        self.name = client_name(name, self.state_dir)
        self.privacy_floor = _floor(privacy_floor)
        if self.federation is not None:
            self.check(self.federation)

    # ---- checks ---------------------------------------------------------------------
    def check(self, federation: str | Path | Scenario) -> None:
        """Raise IncompatibleModelError unless this client's model is the federation's
        base (architecture, adapted modules and their shapes); ModelNotFoundError when the
        base must be loaded here and cannot be found."""
        from fedtune.model.compat import check_compatible
        from fedtune.model.loading import check_model_source

        scenario = _scenario(federation)
        assert scenario is not None
        if self.model is None:
            check_model_source(scenario.model.source)
            return
        check_compatible(self.model, scenario.model.source, scenario.lora.target_modules)

    # ---- federation -----------------------------------------------------------------
    def start(self, server: str, *, insecure: bool = False,
              root_certificates: str | Path | None = None, auth_key: str | Path | None = None,
              on_round: RoundCallback | None = None, on_progress: ProgressCallback | None = None,
              connect_wait: float = 30.0, reconnect_for: float = 600.0) -> Session:
        """Join the federation at ``server`` (HOST:PORT) in a background thread; returns
        the session to wait on or cancel. Exactly one of ``insecure`` (no TLS) and
        ``root_certificates`` (the CA of the server's certificate) is needed."""
        from fedtune.deploy.client import ClientError, ClientOptions, check_local

        session = Session(self, on_round, on_progress)
        options = ClientOptions(
            server=server, data=session.data_key, name=self.name, profile=self.profile,
            insecure=insecure, root_certificates=str(root_certificates or ""),
            auth_key=str(auth_key or ""), state_dir=str(self.state_dir / "flower"),
            connect_wait=connect_wait, reconnect_for=reconnect_for,
            model=session.model_source,
            privacy_floor=self.privacy_floor)
        try:
            check_local(options)
        except ClientError as err:
            session.release()
            raise FederationError(str(err)) from None
        session.begin(options)
        return session

    def run(self, server: str, **options: Any) -> FederationResult:
        """Join the federation at ``server`` and return when its run ends (or the session
        is cancelled); the options are those of ``start``. Ctrl-C cancels cleanly."""
        session = self.start(server, **options)
        try:
            return session.result()
        except KeyboardInterrupt:
            session.cancel()
            session.wait()
            raise

    async def run_async(self, server: str, **options: Any) -> FederationResult:
        """``run`` for applications with an asyncio loop; cancelling the task cancels
        the session."""
        session = self.start(server, **options)
        try:
            return await asyncio.to_thread(session.result)
        except asyncio.CancelledError:
            session.cancel()
            await asyncio.to_thread(session.wait)
            raise

    # ---- alone ----------------------------------------------------------------------
    def train_local(self, steps: int | None = None, *, lr: float | None = None,
                    rank: int | None = None, out: str | Path | None = None,
                    on_progress: ProgressCallback | None = None) -> Any:
        """Personalise without a federation: train a LoRA on this client's data only and
        save it as a peft adapter (see ``fedtune.sdk.local.train_alone``)."""
        from fedtune.sdk.local import train_alone

        def on_step(done: int, total: int, loss: float) -> None:
            if on_progress is not None:
                on_progress(Progress("step", f"step {done}/{total} loss {loss:.4f}", 0, done,
                                     total, loss))

        with _ONE_AT_A_TIME:  # clients in one process share the cached base
            return train_alone(self.texts, self.name,
                               Path(out) if out else self.state_dir / "local-adapter",
                               model=self.model, tokenizer=self.tokenizer,
                               federation=self.federation, steps=steps, lr=lr, rank=rank,
                               on_step=on_step)


def _scenario(federation: str | Path | Scenario | None) -> Scenario | None:
    if federation is None or isinstance(federation, Scenario):
        return federation
    return load_scenario(str(federation))


def _model_choice(model: object, tokenizer: Any) -> tuple[Any, Any]:
    """(model or source string or None, tokenizer of a loaded model)."""
    if model is None:
        return None, None
    if isinstance(model, (str, Path)):
        from fedtune.model.loading import check_model_source

        source = "smollm2" if str(model) == "default" else str(model)
        if Path(source).expanduser().exists():
            source = str(Path(source).expanduser().resolve())
        check_model_source(source)  # ModelNotFoundError names what was looked for
        return source, None
    return model, check_lendable(model, tokenizer)


class Session:
    """One client's participation in one federation run, running in its own thread."""

    def __init__(self, client: Client, on_round: RoundCallback | None,
                 on_progress: ProgressCallback | None) -> None:
        from fedtune.data.local import register_texts
        from fedtune.model.loading import register_model

        self.client = client
        self._on_round, self._on_progress = on_round, on_progress
        self.rounds: list[RoundReport] = []
        self.eval_losses: dict[int, float] = {}
        self.adapter: Path | None = None
        self.last_round = 0
        self._stop = threading.Event()
        self._ended = threading.Event()  # the server ended the run
        self._cancelled = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.data_key = register_texts(client.texts)
        self._lent = not isinstance(client.model, str) and client.model is not None
        self.model_source = (register_model(client.model, client.tokenizer) if self._lent
                             else client.model or "")

    # ---- public ---------------------------------------------------------------------
    def cancel(self) -> None:
        """Leave the federation: training stops at its next step, no reply is sent, and
        the server and the other clients go on without this one."""
        self._cancelled = True
        self._stop.set()

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the session ends (or ``timeout``); True when it has."""
        assert self._thread is not None
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self, timeout: float | None = None) -> FederationResult:
        """The outcome, once the session has ended; raises what ended it otherwise
        (FederationError, IncompatibleModelError, an error of training) and TimeoutError
        when it is still running after ``timeout`` seconds."""
        if not self.wait(timeout):
            raise TimeoutError(f"the session is still running after {timeout} s")
        if self._error is not None:
            raise self._error
        status = "completed" if self._ended.is_set() else "cancelled"
        return FederationResult(status, list(self.rounds), self.adapter, self.last_round,
                                dict(self.eval_losses))

    # ---- running --------------------------------------------------------------------
    def begin(self, options: Any) -> None:
        self._thread = threading.Thread(target=self._serve, args=(options,), daemon=True,
                                        name=f"fedtune-client-{self.client.name}")
        self._thread.start()

    def _serve(self, options: Any) -> None:
        from fedtune.deploy.client import ClientError, run_client
        from fedtune.flower.client_app import make_client_app

        app = make_client_app(listener=self._hear, mods=[self._guard, _serially])
        try:
            run_client(options, say=lambda text: self._progress(Progress("status", text)),
                       stop=self._stop, app=app)
        except ClientError as err:  # the SuperNode ended: expected only when we stopped it
            if self._error is None and not self._cancelled and not self._ended.is_set():
                self._error = FederationError(str(err))
        except BaseException as err:  # noqa: BLE001 - handed to result()
            if self._error is None:
                self._error = err
        finally:
            self.release()

    def _guard(self, message: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
        """Flower mod: an error while handling a message ends the session (result() raises
        it); a cancel ends it quietly. The server gets an error reply either way."""
        from fedtune.deploy.worker import error_reply

        try:
            return call_next(message, context)
        except Cancelled as cancelled:
            self._stop.set()
            return error_reply(message, cancelled)
        except Exception as err:
            if self._error is None:
                self._error = err
            self._stop.set()
            raise

    def _hear(self, event: str, server_round: int, details: dict[str, Any]) -> None:
        """The ClientApp's listener (runs in the worker, inside message handling)."""
        if event == "step":
            if self._cancelled:
                raise Cancelled("the application cancelled this client")
            self._progress(Progress("step", f"round {server_round}: step {details['step']}/"
                                    f"{details['steps']} loss {details['loss']:.4f}",
                                    server_round, details["step"], details["steps"],
                                    details["loss"]))
        elif event == "train":
            report = RoundReport(server_round, dict(details))
            self.rounds.append(report)
            self.last_round = max(self.last_round, server_round)
            self._call(self._on_round, report)
        elif event == "evaluate":
            loss = float(details["eval-loss"])
            self.eval_losses[server_round] = loss
            self._progress(Progress("evaluate", f"round {server_round}: global adapter's "
                                    f"held-out loss here {loss:.4f}", server_round, loss=loss))
        elif event == "final":
            self._keep_final(server_round, details)

    def _keep_final(self, server_round: int, details: dict[str, Any]) -> None:
        from fedtune.model.loading import base_model_name
        from fedtune.model.lora import save_folded_adapter

        scenario: Scenario = details["scenario"]
        if details["adapter"]:
            self.adapter = save_folded_adapter(self.client.state_dir / "adapter",
                                               details["adapter"], scenario.lora,
                                               base_model_name(scenario.model))
        self.last_round = max(self.last_round, server_round)
        self._ended.set()
        self._progress(Progress("status", f"the federation ended after round {server_round}; "
                                f"final adapter in {self.adapter}", server_round))
        timer = threading.Timer(END_GRACE_S, self._stop.set)
        timer.daemon = True
        timer.start()

    def _progress(self, progress: Progress) -> None:
        self._call(self._on_progress, progress)

    @staticmethod
    def _call(callback: Callable[[Any], None] | None, value: Any) -> None:
        """An application's callback; its errors are logged, never fatal to training."""
        if callback is None:
            return
        try:
            callback(value)
        except Exception:  # noqa: BLE001
            log.exception("fedtune: the application's callback raised")

    def release(self) -> None:
        """Hand back what the session borrowed: the texts, and a lent model without its
        LoRA layers."""
        from fedtune.data.local import unregister_texts
        from fedtune.model.cache import give_back

        unregister_texts(self.data_key)
        if self._lent:
            with _ONE_AT_A_TIME:
                give_back(self.model_source)
