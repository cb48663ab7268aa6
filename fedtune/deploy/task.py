"""One ClientApp task in a fresh process (``fedtune client --per-message-process``).

The long-lived worker claims each task and starts this module for it, so every message
pays Flower's default cost (imports, model load) but runs fedtune's installed ClientApp
behind the same run check: the app is never taken from the run's FAB, so a run the
client does not serve cannot bring its own code. The task token comes in the
environment (not on the command line, where other users could read it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

TOKEN_VARIABLE = "FEDTUNE_TASK_TOKEN"


def command(address: str, app: str, ca_file: str = "", host: str = "",
            pin_file: str = "") -> list[str]:
    """The command line ``fedtune.deploy.client`` starts for each task."""
    return [sys.executable, "-m", "fedtune.deploy.task", address, app,
            "--ca", ca_file, "--host", host, "--pin-file", pin_file]


def load_app(reference: str) -> object:
    """The installed ClientApp named ``module:attribute`` (attribute defaults to ``app``)."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute or "app")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedtune.deploy.task")
    parser.add_argument("address")
    parser.add_argument("app")
    parser.add_argument("--ca", default="")
    parser.add_argument("--host", default="")
    parser.add_argument("--pin-file", default="")
    args = parser.parse_args(argv)
    from fedtune.deploy.seal import RunPin
    from fedtune.deploy.worker import handle_task

    pin = RunPin(args.ca, args.host, args.pin_file or None) if args.ca else None
    status = handle_task(args.address, os.environ[TOKEN_VARIABLE],
                         lambda: load_app(args.app), pin=pin)
    print(status)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
