"""Notes assistant: learns to write like you from your notes, without sending them anywhere.

A small but complete application of the fedtune SDK. It takes part in a federation
(your notes train a LoRA adapter on this machine; only the adapter's factors travel),
or, with --local, personalises on your notes alone. Then it loads the adapter it got
onto the base model and continues a prompt in your style, next to the base model's
continuation for comparison.

    python examples/notes_assistant/notes_assistant.py my_notes.txt --server HOST:PORT \\
        --root-certificates ca.pem --ask "Meeting with the team:"

Notes file: notes separated by blank lines (or one *.jsonl record per note).
Uses only the public API: ``from fedtune import ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fedtune


def read_notes(path: Path) -> list[str]:
    """One text per note: blocks separated by blank lines (a *.jsonl is read by fedtune)."""
    if path.suffix == ".jsonl":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    blocks = path.read_text(encoding="utf-8").split("\n\n")
    return [" ".join(block.split()) for block in blocks if block.strip()]


def notes_data(path: Path) -> list[str] | Path:
    return path if path.suffix == ".jsonl" else read_notes(path)


def continue_text(model, tokenizer, prompt: str, tokens: int) -> str:
    """Greedy continuation of ``prompt`` (deterministic, so runs compare)."""
    import torch

    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def show_round(report: fedtune.RoundReport) -> None:
    print(f"round {report.round}: trained on {report.num_examples} blocks of your notes, "
          f"loss {report.train_loss:.4f}", flush=True)


def show_progress(progress: fedtune.Progress) -> None:
    if progress.kind != "step":
        print(progress.message, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notes", type=Path, help="your notes (text, blank-line separated)")
    parser.add_argument("--server", help="the federation's HOST:PORT (omit with --local)")
    parser.add_argument("--root-certificates", help="CA certificate of the server")
    parser.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    parser.add_argument("--local", action="store_true", help="personalise alone, no server")
    parser.add_argument("--model", default=None,
                        help="your copy of the base model (default: the federation's)")
    parser.add_argument("--name", default=None, help="this device's name in the federation")
    parser.add_argument("--state-dir", type=Path, default=Path.home() / ".notes-assistant")
    parser.add_argument("--ask", default="Today I", help="the prompt to continue")
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args(argv)
    if not args.local and not args.server:
        parser.error("give --server HOST:PORT, or --local to train without a federation")

    try:
        client = fedtune.Client(notes_data(args.notes), model=args.model, name=args.name,
                                state_dir=args.state_dir)
        if args.local:
            local = client.train_local(on_progress=show_progress)
            print(f"local training: held-out loss {local.eval_loss_before:.4f} -> "
                  f"{local.eval_loss_after:.4f}")
            adapter = local.adapter
        else:
            result = client.run(args.server, insecure=args.insecure,
                                root_certificates=args.root_certificates,
                                on_round=show_round, on_progress=show_progress)
            if result.adapter is None:
                print(f"the federation did not finish ({result.status})", file=sys.stderr)
                return 1
            adapter = result.adapter
    except (fedtune.DataError, fedtune.IncompatibleModelError, fedtune.FederationError,
            fedtune.ModelNotFoundError) as err:
        print(f"notes assistant: {err}", file=sys.stderr)
        return 1

    base, tokenizer = fedtune.load_model(args.model or fedtune.base_of(adapter))
    plain = continue_text(base, tokenizer, args.ask, args.tokens)
    assistant = fedtune.load_adapter(base, adapter)
    yours = continue_text(assistant, tokenizer, args.ask, args.tokens)
    print(f"adapter: {adapter}")
    print(f"base model : {args.ask}{plain}")
    print(f"your style : {args.ask}{yours}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
