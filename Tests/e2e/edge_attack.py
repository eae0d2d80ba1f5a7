"""A slow-client attacker for Tests/e2e/test_edge.py, run as its own process (standard library only):

    python edge_attack.py '{"port": 8000, "connections": 1000, "duration_s": 9, "open_rate": 400,
                            "path": "/v2/models/edge_echo/infer", "content_length": 1000, "sent_body": 500}'

Opens `connections` connections (paced at `open_rate` per second): each sends the head of a POST
announcing `content_length` bytes of body and only `sent_body` of them, then holds, reading whatever
the server sends, until the server closes it or `duration_s` have passed. With `"reopen": true` a
connection the server closed is replaced at once (as a persistent attacker would), so that the
attacker keeps `connections` open for `duration_s`. Prints one JSON summary on stdout: how each
connection ended (`408`, another answer, `eof` without an answer, `reset`, or `held` at the end), how
long it was held from its first byte to its end, and how many were open at once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)
    return {"n": len(ordered), "min": round(ordered[0], 3), "p50": rank(0.5), "p90": rank(0.9), "max": round(ordered[-1], 3)}


class Attack:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.host = cfg.get("host", "127.0.0.1")
        self.port = int(cfg["port"])
        body = b"x" * int(cfg["sent_body"])
        self.payload = (
            f"POST {cfg['path']} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {int(cfg['content_length'])}\r\n\r\n"
        ).encode() + body
        self.started = time.monotonic()
        self.stop_at = self.started + float(cfg["duration_s"])
        self.interval = 1.0 / float(cfg["open_rate"])
        self.next_open = self.started
        self.opened = 0
        self.connect_errors: dict[str, int] = {}
        self.open_now = 0
        self.peak_open = 0
        self.outcomes: dict[str, int] = {}
        self.hold: dict[str, list[float]] = {}
        self.samples: dict[str, str] = {}
        self.held_ages: list[float] = []
        self.write_errors = 0
        self.reopen = bool(cfg.get("reopen", False))

    async def pace(self) -> None:
        now = time.monotonic()
        slot = max(now, self.next_open)
        self.next_open = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)

    def record(self, outcome: str, held: float, sample: bytes) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.hold.setdefault(outcome, []).append(held)
        if outcome not in self.samples:
            self.samples[outcome] = sample[:200].decode(errors="replace")

    async def one(self) -> None:
        while True:
            await self.pace()
            if time.monotonic() >= self.stop_at:
                return
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5)
            except (OSError, asyncio.TimeoutError) as error:
                kind = type(error).__name__
                self.connect_errors[kind] = self.connect_errors.get(kind, 0) + 1
                await asyncio.sleep(0.05)
                continue
            self.opened += 1
            self.open_now += 1
            self.peak_open = max(self.peak_open, self.open_now)
            first_byte = time.monotonic()
            got = b""
            outcome = "held"
            try:
                writer.write(self.payload)
                try:
                    await writer.drain()
                except OSError:
                    self.write_errors += 1
                while True:
                    remaining = self.stop_at - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        chunk = await asyncio.wait_for(reader.read(4096), remaining)
                    except asyncio.TimeoutError:
                        break
                    if not chunk:
                        outcome = "eof"
                        break
                    got += chunk
            except (ConnectionResetError, BrokenPipeError):
                outcome = "reset"
            except OSError as error:
                outcome = f"error:{type(error).__name__}"
            ended = time.monotonic()
            if got:
                status = got.split(b"\r\n", 1)[0]
                parts = status.split(b" ")
                code = parts[1].decode(errors="replace") if len(parts) > 1 and status.startswith(b"HTTP/") else "garbage"
                outcome = f"{code}" if outcome != "held" else f"held-after-{code}"
            if outcome == "held":
                self.held_ages.append(ended - first_byte)
            else:
                self.record(outcome, ended - first_byte, got)
            self.open_now -= 1
            writer.close()
            if outcome == "held" or not self.reopen:
                return

    async def run(self) -> dict:
        await asyncio.gather(*(self.one() for _ in range(int(self.cfg["connections"]))))
        return {
            "opened": self.opened,
            "connect_errors": self.connect_errors,
            "write_errors": self.write_errors,
            "peak_open": self.peak_open,
            "outcomes": self.outcomes,
            "hold_s": {k: _percentiles(v) for k, v in self.hold.items()},
            "samples": self.samples,
            "held_at_end": len(self.held_ages),
            "held_age_s": _percentiles(self.held_ages),
            "ran_s": round(time.monotonic() - self.started, 3),
        }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    summary = asyncio.run(Attack(cfg).run())
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
