"""An outsider's traffic against the clients' port: it holds the CA certificate and
nothing else. Every attack goes to 127.0.0.1 from another loopback address (the
outsider is another machine: ``SOURCE``), is bounded in count and in time, and closes
everything it opened. Each attack runs in a process of its own (``python -m
tests.deploy.outsider PHASE PORT CA_CERT`` prints its outcome as JSON), so that the
attacker's own work never slows the honest probe of the test process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import ssl
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx

#: the outsider's own address (any 127/8 address reaches the server on loopback)
SOURCE = "127.0.0.2"


def raise_own_fd_limit(needed: int) -> None:
    """The attacking process needs an fd per connection it holds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


#: why connections the outsider tried did not open (exception name -> count)
FAILED: Counter[str] = Counter()


async def _open(port: int, tls: ssl.SSLContext, timeout: float
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        return await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname="127.0.0.1",
            local_addr=(SOURCE, 0)), timeout)
    except (OSError, TimeoutError, ssl.SSLError) as err:
        FAILED[type(err).__name__] += 1
        return None


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 2)


@dataclass
class Outcome:
    """What one attack saw: connections it got (TLS done), answers' status lines."""

    opened: int = 0
    answers: list[bytes] = field(default_factory=list)
    seconds: float = 0.0
    #: the most body bytes one upload got into its socket before the server stopped it
    sent_max: int = 0


async def idle_connections(port: int, tls: ssl.SSLContext, count: int, hold: float
                           ) -> Outcome:
    """``count`` TLS connections that send half a request line, then wait ``hold`` s."""
    out = Outcome()
    started = time.monotonic()

    async def one() -> None:
        opened = await _open(port, tls, 30)
        if opened is None:
            return
        out.opened += 1
        reader, writer = opened
        try:
            writer.write(b"POST /v1/fleet/pull-me")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.read(), hold)
        finally:
            await _close(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    out.seconds = time.monotonic() - started
    return out


async def slow_uploads(port: int, tls: ssl.SSLContext, count: int, hold: float,
                       declared: int = 10_000_000, every: float = 5.0,
                       route: str = "/v1/fleet/push-object") -> Outcome:
    """``count`` uploads declaring ``declared`` bytes that send one byte every
    ``every`` seconds, for at most ``hold`` seconds each."""
    out = Outcome()
    started = time.monotonic()

    async def one() -> None:
        opened = await _open(port, tls, 30)
        if opened is None:
            return
        out.opened += 1
        reader, writer = opened
        try:
            writer.write(f"POST {route} HTTP/1.1\r\nhost: x\r\ncontent-type: "
                         f"application/protobuf\r\ncontent-length: {declared}\r\n\r\n".encode())
            until = time.monotonic() + hold
            while time.monotonic() < until:
                writer.write(b"x")
                try:
                    await writer.drain()
                    answer = await asyncio.wait_for(reader.read(4096), every)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if answer:
                    out.answers.append(answer.split(b"\r\n", 1)[0])
                break
        finally:
            await _close(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    out.seconds = time.monotonic() - started
    return out


async def stalled_uploads(port: int, tls: ssl.SSLContext, count: int, hold: float,
                          declared: int = (64 << 20) - 1) -> Outcome:
    """``count`` uploads of ``declared`` bytes that send all but the last byte as fast
    as the server takes them, then stall, for at most ``hold`` seconds each."""
    out = Outcome()
    started = time.monotonic()
    chunk = b"\0" * (1 << 20)

    async def one() -> None:
        opened = await _open(port, tls, 30)
        if opened is None:
            return
        out.opened += 1
        reader, writer = opened
        until = time.monotonic() + hold
        try:
            writer.write(f"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\n"
                         f"content-length: {declared}\r\n\r\n".encode())
            left = declared - 1
            while left > 0 and time.monotonic() < until and not reader.at_eof():
                piece = chunk[:min(left, len(chunk))]
                writer.write(piece)
                try:
                    await asyncio.wait_for(writer.drain(), max(until - time.monotonic(), 0.01))
                except (TimeoutError, OSError):
                    break
                left -= len(piece)
            out.sent_max = max(out.sent_max, declared - 1 - left)
            with contextlib.suppress(Exception):
                answer = await asyncio.wait_for(reader.read(4096),
                                                max(until - time.monotonic(), 0.01))
                if answer:
                    out.answers.append(answer.split(b"\r\n", 1)[0])
        finally:
            await _close(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    out.seconds = time.monotonic() - started
    return out


class Probe:
    """An honest health probe (its own TLS connection each time) every ``every`` s,
    from 127.0.0.1, in a thread: the latency of each, and the failures."""

    def __init__(self, port: int, ca_cert: str, every: float = 0.5) -> None:
        self.url = f"https://127.0.0.1:{port}/health"
        self.context = ssl.create_default_context(cafile=ca_cert)
        self.every = every
        self.samples: list[tuple[float, float, int]] = []  # (when, seconds, status)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.every):
            started = time.monotonic()
            try:
                with httpx.Client(verify=self.context, timeout=30) as client:
                    status = client.get(self.url).status_code
            except httpx.HTTPError:
                status = 0
            self.samples.append((started, time.monotonic() - started, status))

    def between(self, start: float, end: float) -> list[tuple[float, int]]:
        return [(s, c) for t, s, c in self.samples if start <= t <= end]

    def stop(self) -> None:
        self.done.set()
        self.thread.join(35)


#: the attacks of tests/deploy/test_flood.py: (function, count, seconds each is held)
PHASES = {"idle": (idle_connections, 2000, 12.0), "slow": (slow_uploads, 300, 12.0),
          "stalled": (stalled_uploads, 64, 10.0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=sorted(PHASES))
    parser.add_argument("port", type=int)
    parser.add_argument("ca_cert")
    args = parser.parse_args()
    attack, count, hold = PHASES[args.phase]
    raise_own_fd_limit(count + 256)
    tls = ssl.create_default_context(cafile=args.ca_cert)
    outcome = asyncio.run(attack(args.port, tls, count, hold))
    print(json.dumps({**asdict(outcome), "not_opened": dict(FAILED),
                      "answers": [a.decode(errors="replace") for a in outcome.answers]}))


if __name__ == "__main__":
    main()
