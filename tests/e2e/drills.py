"""The fault drills' harness: a paced publisher, reconnecting subscribers, a checker.

A drill publishes numbered events at a steady rate through nginx while a set
of subscribers reads them through nginx, then a fault is injected (Redis
restarted or frozen, a replica killed, ...). The checker then proves the
invariant the README promises: every event the publisher got a 202 for
reached every subscriber exactly once and in order.

- `PacedPublisher` (a thread): event n carries `{"n": n, "t": <send time>}`.
  A 503 with Retry-After means "not stored": it waits that long and retries
  the same numbers. Every request has an Idempotency-Key, so a request that
  timed out in the publisher but ran in Redis later (a frozen Redis) comes
  back as the same event instead of a second one. Anything else that is not a
  202 is recorded as a failure.
- `SubscriberPool` (one thread, one asyncio loop, any number of clients):
  each client behaves like a browser's EventSource. On the end of a stream or
  an error it reconnects after the `retry:` delay with `Last-Event-ID` set to
  the last id it saw (id-only position frames included). Non-200 answers are
  recorded (a browser would give up for good on them) and retried.
- `check` compares what the publisher got acknowledged with what each client
  received and returns the drill's report (a dict, for the `measurements`).

Everything is bounded: publisher and clients stop at their deadline at the
latest, and every wait is on a time.monotonic() deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import resource
import secrets
import selectors
import socket
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import requests

from tests.e2e.support import Stack, seq_of, wait_until
from tests.support.sse import Event, SSEParser

# -- small utilities ----------------------------------------------------------------


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit (soft, up to the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value at `fraction` (0..1) of the sorted values (nearest rank); 0.0 if none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def prometheus_totals(text: str) -> dict[str, float]:
    """Sum of every sample of each metric name in a Prometheus text exposition."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def service_metrics(stack: Stack, container: str) -> dict[str, float]:
    """The service's /metrics (summed over label sets), read inside its container."""
    return prometheus_totals(stack.internal_get(container, "/metrics"))


def stream_stats(stack: Stack, container: str) -> dict[str, Any]:
    """A stream replica's /stats (its worker's gauges and counters)."""
    result: dict[str, Any] = json.loads(stack.internal_get(container, "/stats"))
    return result


def wait_spread(stack: Stack, containers: Sequence[str], timeout: float = 30) -> int:
    """Wait until nginx sends new streams to every replica; return the streams it took.

    nginx re-resolves the service name only when its cached answer (DNS_VALID)
    expires, so right after a scale-up or a restart new streams may all go to
    the replicas it knew. Streams are opened (and held) a few at a time until
    each replica has at least one, then closed."""
    channel = f"spread.{secrets.token_hex(4)}"
    held: list[tuple[requests.Response, Iterator[bytes]]] = []

    def everywhere() -> bool:
        for _ in range(3):
            response = stack.open_stream([channel], read_timeout=10)
            # Keep the iterator: dropping it would close the connection (urllib3).
            chunks = response.iter_content(chunk_size=None)
            held.append((response, chunks))
            if response.status_code == 200:
                next(chunks)  # the preamble: the stream is attached
        return all(stream_stats(stack, c)["clients"] > 0 for c in containers)

    try:
        wait_until(everywhere, timeout, f"nginx to route streams to all of {list(containers)}", 0.0)
    finally:
        for response, _ in held:
            response.close()
    return len(held)


def metric_by_replica(stack: Stack, containers: Iterable[str], name: str) -> dict[str, float]:
    return {c: service_metrics(stack, c).get(name, 0.0) for c in containers}


# -- the publisher --------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    n: int
    id: str
    seq: int
    sent: float  # monotonic time of the first attempt
    acked: float  # monotonic time of the 202


class PacedPublisher(threading.Thread):
    """Publishes events 0, 1, 2, ... on one channel at `rate` requests per second.

    With `batch` > 1 each request is a JSON array of that many events; `pad`
    adds that many bytes of filler to each event's data. Stops on stop(), after
    `max_events`, or at `deadline` (monotonic); an event already being retried
    is finished first (within the deadline).
    """

    def __init__(
        self,
        stack: Stack,
        channel: str,
        *,
        rate: float,
        deadline: float,
        batch: int = 1,
        pad: int = 0,
        max_events: int | None = None,
        event: str = "tick",
    ) -> None:
        super().__init__(name=f"publisher-{channel}", daemon=True)
        self.stack = stack
        self.channel = channel
        self.rate = rate
        self.deadline = deadline
        self.batch = batch
        self.pad = "x" * pad
        self.max_events = max_events
        self.event = event
        self.acked: list[Ack] = []
        self.statuses: Counter[int] = Counter()
        self.unavailable: list[tuple[float, str]] = []  # (when, Retry-After) of every 503
        self.failures: list[str] = []  # every answer that was neither 202 nor 503 + Retry-After
        # 202s with Idempotent-Replayed: the retry of a request that was answered 503
        # (the only status retried without failing) although Redis had run it.
        self.replayed = 0
        self.slowest_request = 0.0
        self._stopping = threading.Event()
        self._key_prefix = f"drill-{secrets.token_hex(4)}"

    def stop(self) -> None:
        self._stopping.set()

    def wait_acked(self, count: int, timeout: float) -> None:
        """Wait until at least `count` events were acknowledged in all."""
        wait_until(
            lambda: len(self.acked) >= count,
            timeout,
            f"{count} acknowledged events (have {len(self.acked)}; failures {self.failures[-3:]})",
            0.05,
        )

    def _body(self, first: int, sent: float) -> bytes:
        events = [
            {"channel": self.channel, "event": self.event, "data": self._data(n, sent)}
            for n in range(first, first + self.batch)
        ]
        return json.dumps(events if self.batch > 1 else events[0]).encode()

    def _data(self, n: int, sent: float) -> dict[str, Any]:
        data: dict[str, Any] = {"n": n, "t": round(sent, 6)}
        if self.pad:
            data["pad"] = self.pad
        return data

    def run(self) -> None:
        session = requests.Session()
        url = self.stack.url("/publish")
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        n = 0
        try:
            while not self._stopping.is_set() and time.monotonic() < self.deadline:
                if self.max_events is not None and n >= self.max_events:
                    return
                pause = next_at - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # pacing, not synchronisation
                if not self._publish(session, url, n):
                    return  # the deadline passed while retrying
                n += self.batch
                next_at = max(next_at + interval, time.monotonic() - interval)
        finally:
            session.close()

    def _publish(self, session: requests.Session, url: str, first: int) -> bool:
        """Publish events first.. until they are acknowledged; False at the deadline."""
        sent = time.monotonic()
        body = self._body(first, sent)
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {self.stack.token}",
            "Idempotency-Key": f"{self._key_prefix}-{first}",
        }
        while time.monotonic() < self.deadline:
            began = time.monotonic()
            try:
                answer = session.post(url, data=body, headers=headers, timeout=15)
            except requests.RequestException as exc:
                self.failures.append(f"{began:.2f} n={first}: {exc!r}")
                time.sleep(0.5)
                continue
            self.slowest_request = max(self.slowest_request, time.monotonic() - began)
            self.statuses[answer.status_code] += 1
            if answer.status_code == 202:
                done = time.monotonic()
                payload = answer.json()
                answers = payload["events"] if self.batch > 1 else [payload]
                for offset, item in enumerate(answers):
                    self.acked.append(Ack(first + offset, item["id"], seq_of(item["id"]), sent, done))
                if answer.headers.get("Idempotent-Replayed") == "true":
                    self.replayed += 1
                return True
            retry_after = answer.headers.get("Retry-After")
            if answer.status_code == 503 and retry_after and retry_after.isdigit():
                self.unavailable.append((began, retry_after))
                time.sleep(min(float(retry_after), max(0.0, self.deadline - time.monotonic())))
                continue
            self.failures.append(f"{began:.2f} n={first}: {answer.status_code} {answer.text[:200]}")
            time.sleep(0.5)
        return False


# -- the subscribers ------------------------------------------------------------------


class ProtocolError(Exception):
    """The HTTP answer could not be parsed."""


class ChunkedDecoder:
    """Incremental decoder of the chunked transfer coding (RFC 9112, section 7.1)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0
        self._state = "size"
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while not self.done:
            if self._state == "size":
                cut = self._buf.find(b"\r\n")
                if cut < 0:
                    break
                try:
                    size = int(bytes(self._buf[:cut]).split(b";", 1)[0], 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size line {bytes(self._buf[:cut])!r}") from None
                del self._buf[: cut + 2]
                if size == 0:
                    self.done = True
                    break
                self._left, self._state = size, "data"
            elif self._state == "data":
                take = min(self._left, len(self._buf))
                if take == 0:
                    break
                out += self._buf[:take]
                del self._buf[:take]
                self._left -= take
                if self._left:
                    break
                self._state = "crlf"
            else:
                if len(self._buf) < 2:
                    break
                del self._buf[:2]
                self._state = "size"
        return bytes(out)


@dataclass
class Subscriber:
    """One browser-like client's view: what it received, and how its connections went."""

    name: str
    channels: list[str]
    retry: float  # seconds; updated by `retry:` fields
    last_id: str | None = None
    seqs: list[int] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    others: list[str] = field(default_factory=list)  # events other than ticks (a reset, ...)
    connections: int = 0  # answers 200
    refused: list[tuple[float, int, str]] = field(default_factory=list)  # non-200 answers
    errors: list[str] = field(default_factory=list)  # connect failures, resets, bad answers
    ended_at: list[float] = field(default_factory=list)  # a stream ended (reconnect needed)
    reconnect_times: list[float] = field(default_factory=list)  # end -> next 200, s
    stalls: int = 0  # streams silent for longer than the read timeout (heartbeats included)
    open: bool = False  # a stream is open right now
    parser: SSEParser = field(default_factory=SSEParser)

    def feed(self, data: bytes, now: float) -> None:
        """Take the next bytes of the stream (parsed by tests.support.sse)."""
        for frame in self.parser.feed(data):
            if self.parser.retry is not None:
                self.retry = self.parser.retry / 1000
            self.last_id = self.parser.last_event_id or None
            if frame.event is not None:
                self._event(frame.event, now)

    def _event(self, event: Event, now: float) -> None:
        if event.event == "tick" and event.id:
            body = json.loads(event.data)
            self.seqs.append(event.seq)
            self.numbers.append(int(body["n"]))
            self.received_at.append(now)
            self.sent_at.append(float(body["t"]))
        else:
            self.others.append(f"{event.event} {event.id} {event.data[:200]}")

    def reset_parser(self) -> None:
        """A new connection: what the old one left unfinished is dropped."""
        self.parser.reconnect()


class SubscriberPool(threading.Thread):
    """`count` browser-like SSE clients on one asyncio loop, in one thread.

    `channels(i)` gives client i's channels. The first connections are opened
    `ramp` at a time; reconnects are not limited (like browsers after a
    replica went away). A stream silent for `read_timeout` s (no heartbeat
    either) is counted as a stall, then treated as broken.
    """

    def __init__(
        self,
        port: int,
        channels: Sequence[str] | Callable[[int], Sequence[str]],
        count: int,
        *,
        retry_ms: int,
        deadline: float,
        read_timeout: float = 10.0,
        ramp: int = 50,
        name: str = "subscribers",
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.port = port
        self.deadline = deadline
        self.read_timeout = read_timeout
        self.ramp = ramp

        def pick(i: int) -> list[str]:
            return list(channels(i) if callable(channels) else channels)

        self.subscribers = [Subscriber(f"{name}-{i}", pick(i), retry_ms / 1000) for i in range(count)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self.crash: BaseException | None = None

    # -- control, from the test's thread

    def start_and_wait_live(self, timeout: float) -> None:
        """Start, and wait until every client has its first stream open and positioned."""
        self.start()
        wait_until(
            lambda: all(s.last_id is not None and s.open for s in self.subscribers),
            timeout,
            f"{len(self.subscribers)} live streams "
            f"({sum(s.last_id is not None for s in self.subscribers)} live; crash {self.crash!r}; "
            f"refused {Counter(r[1] for s in self.subscribers for r in s.refused)}; "
            f"errors {[e for s in self.subscribers for e in s.errors][:3]})",
            0.1,
        )

    def stop(self, timeout: float = 20) -> None:
        if self.ident is None:
            return  # never started
        if self._started.wait(5) and self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(timeout)

    def received_all(self, seqs: set[int]) -> bool:
        return all(seqs.issubset(s.seqs) for s in self.subscribers)

    def wait_received(self, seqs: set[int], timeout: float) -> None:
        """Wait until every client received every one of `seqs` (or give up silently:
        the checker reports what is missing)."""
        with contextlib.suppress(AssertionError):
            wait_until(lambda: self.received_all(seqs), timeout, "every client to receive every event", 0.1)

    # -- the loop

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start_and_wait_live and check
            self.crash = exc

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._started.set()
        gate = asyncio.Semaphore(self.ramp)
        tasks = [asyncio.create_task(self._client(s, gate)) for s in self.subscribers]
        remaining = self.deadline - time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(remaining, 0))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, sub: Subscriber, gate: asyncio.Semaphore) -> None:
        assert self._stopping is not None
        first = True
        while not self._stopping.is_set() and time.monotonic() < self.deadline:
            writer: asyncio.StreamWriter | None = None
            try:
                if first:
                    first = False
                    async with gate:
                        reader, writer, headers = await self._open(sub)
                else:
                    reader, writer, headers = await self._open(sub)
                if headers is not None:
                    await self._read(sub, reader, headers)
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, ProtocolError, asyncio.IncompleteReadError) as exc:
                sub.errors.append(f"{time.monotonic():.2f} {exc!r}")
            finally:
                if writer is not None:
                    writer.transport.abort()
            sub.open = False
            sub.ended_at.append(time.monotonic())
            await asyncio.sleep(sub.retry)

    async def _open(
        self, sub: Subscriber
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, str] | None]:
        """Connect and send the request like EventSource; the answer's headers if it is a
        stream (200, text/event-stream), else None (the answer is recorded as refused)."""
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        writer.write(stream_request(self.port, sub.channels, sub.last_id))
        async with asyncio.timeout(15):
            head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {lines[0]!r}")
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 200 or not headers.get("content-type", "").startswith("text/event-stream"):
            body = b""
            with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                async with asyncio.timeout(2):
                    body = await reader.read(300)
            sub.refused.append((time.monotonic(), status, body[:200].decode(errors="replace")))
            return reader, writer, None
        return reader, writer, headers

    async def _read(self, sub: Subscriber, reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
        """Read one stream until it ends, feeding the parser."""
        now = time.monotonic()
        sub.connections += 1
        sub.open = True
        if sub.ended_at:
            sub.reconnect_times.append(now - sub.ended_at[-1])
        sub.reset_parser()
        decoder = ChunkedDecoder() if "chunked" in headers.get("transfer-encoding", "") else None
        while True:
            try:
                async with asyncio.timeout(self.read_timeout):
                    data = await reader.read(1 << 16)
            except TimeoutError:
                sub.stalls += 1
                return
            if not data:
                return  # EOF: the stream ended (cleanly or not)
            if decoder is not None:
                data = decoder.feed(data)
            sub.feed(data, time.monotonic())
            if decoder is not None and decoder.done:
                return


# -- the checker ----------------------------------------------------------------------


def check(publisher: PacedPublisher, pool: SubscriberPool) -> dict[str, Any]:
    """Acknowledged events versus what every subscriber received: the drill's report."""
    acked = list(publisher.acked)
    acked_seqs = {a.seq for a in acked}
    numbers_by_seq = {a.seq: a.n for a in acked}
    lost = duplicated = out_of_order = unacknowledged = wrong_number = 0
    pauses: list[float] = []
    latencies: list[float] = []
    for sub in pool.subscribers:
        seqs = list(sub.seqs)
        counts = Counter(seqs)
        duplicated += sum(c - 1 for c in counts.values() if c > 1)
        # The same number under two ids would be a duplicate too (a publish stored twice).
        duplicated += sum(c - 1 for c in Counter(sub.numbers).values() if c > 1) - sum(
            c - 1 for c in counts.values() if c > 1
        )
        lost += len(acked_seqs - counts.keys())
        unacknowledged += len(counts.keys() - acked_seqs)
        out_of_order += sum(1 for a, b in itertools.pairwise(seqs) if b <= a)
        wrong_number += sum(
            1
            for s, n in zip(seqs, sub.numbers, strict=False)
            if s in numbers_by_seq and numbers_by_seq[s] != n
        )
        times = sub.received_at
        if len(times) > 1:
            pauses.append(max(b - a for a, b in itertools.pairwise(times)))
        latencies.extend(r - s for r, s in zip(sub.received_at, sub.sent_at, strict=False))
    reconnects = [t for s in pool.subscribers for t in s.reconnect_times]
    refused = Counter(r[1] for s in pool.subscribers for r in s.refused)
    report: dict[str, Any] = {
        "subscribers": len(pool.subscribers),
        "acknowledged": len(acked),
        "delivered": sum(len(s.seqs) for s in pool.subscribers),
        "expected": len(acked) * len(pool.subscribers),
        "lost": lost,
        "duplicated": duplicated,
        "out_of_order": out_of_order,
        "wrong_number": wrong_number,
        "unacknowledged_delivered": unacknowledged,
        "longest_pause_s": round(max(pauses, default=0.0), 2),
        "latency_ms_p50_p99": (
            round(percentile(latencies, 0.5) * 1000, 1),
            round(percentile(latencies, 0.99) * 1000, 1),
        ),
        "reconnects": len(reconnects),
        "reconnect_s_median_max": (
            round(statistics.median(reconnects), 2) if reconnects else 0.0,
            round(max(reconnects, default=0.0), 2),
        ),
        "refused": dict(refused),
        "client_errors": sum(len(s.errors) for s in pool.subscribers),
        "stalls": sum(s.stalls for s in pool.subscribers),
        "other_events": sum(len(s.others) for s in pool.subscribers),
        "publish_statuses": dict(publisher.statuses),
        "publish_503s": len(publisher.unavailable),
        "publish_failures": len(publisher.failures),
        "stored_despite_503": publisher.replayed,
        "slowest_publish_s": round(publisher.slowest_request, 2),
    }
    if pool.crash is not None:
        report["pool_crash"] = repr(pool.crash)
    return report


def assert_exactly_once(report: dict[str, Any], pool: SubscriberPool, publisher: PacedPublisher) -> None:
    """The invariant of every drill: nothing acknowledged lost, duplicated or reordered."""
    details = {
        "failures": publisher.failures[:5],
        "others": [o for s in pool.subscribers for o in s.others][:5],
        "errors": [e for s in pool.subscribers for e in s.errors][:5],
    }
    assert "pool_crash" not in report, (report, details)
    assert report["acknowledged"] > 0, report
    assert report["lost"] == 0, (report, details)
    assert report["duplicated"] == 0, (report, details)
    assert report["out_of_order"] == 0, (report, details)
    assert report["wrong_number"] == 0, (report, details)
    assert report["other_events"] == 0, (report, details)  # no reset: history covered every gap
    assert report["publish_failures"] == 0, (report, details)
    assert report["stalls"] == 0, (report, details)  # no stream silently hung


class Drill:
    """A publisher and a pool of subscribers on one fresh channel; `finish` checks.

    Use as a context manager: the threads are stopped however the test ends.
    """

    def __init__(
        self,
        stack: Stack,
        *,
        subscribers: int,
        rate: float,
        duration_limit: float = 150,
        batch: int = 1,
        pad: int = 0,
        max_events: int | None = None,
        read_timeout: float = 10.0,
        ramp: int = 50,
        publish_on_enter: bool = True,
    ) -> None:
        self.stack = stack
        self.publish_on_enter = publish_on_enter
        self.channel = f"drill.{secrets.token_hex(5)}"
        deadline = time.monotonic() + duration_limit
        retry_ms = int(stack.settings.get("RETRY_MS", "3000"))
        self.pool = SubscriberPool(
            stack.port,
            [self.channel],
            subscribers,
            retry_ms=retry_ms,
            deadline=deadline,
            read_timeout=read_timeout,
            ramp=ramp,
            name=self.channel,
        )
        self.publisher = PacedPublisher(
            stack,
            self.channel,
            rate=rate,
            deadline=deadline - 20,
            batch=batch,
            pad=pad,
            max_events=max_events,
        )
        self.started_at = 0.0

    def __enter__(self) -> Drill:
        raise_nofile(4 * len(self.pool.subscribers) + 1024)
        self.pool.start_and_wait_live(timeout=60)
        if self.publish_on_enter:
            self.start_publishing()
        return self

    def start_publishing(self) -> None:
        self.started_at = time.monotonic()
        self.publisher.start()

    def __exit__(self, *exc: object) -> None:
        self.publisher.stop()
        if self.publisher.is_alive():
            self.publisher.join(30)
        self.pool.stop()

    def finish(self, deliver_timeout: float = 30) -> dict[str, Any]:
        """Stop publishing, wait for the deliveries, stop the clients; the report."""
        self.publisher.stop()
        self.publisher.join(60)
        assert not self.publisher.is_alive(), "the publisher did not stop"
        self.pool.wait_received({a.seq for a in self.publisher.acked}, deliver_timeout)
        open_at_end = sum(s.open for s in self.pool.subscribers)
        self.pool.stop()
        report = check(self.publisher, self.pool)
        report["open_at_end"] = open_at_end
        report["drill_s"] = round(time.monotonic() - self.started_at, 1)
        return report

    def assert_exactly_once(self, report: dict[str, Any]) -> None:
        assert_exactly_once(report, self.pool, self.publisher)


# -- slow and vanishing clients ---------------------------------------------------------


def stream_request(port: int, channels: Sequence[str], last_event_id: str | None = None) -> bytes:
    params = urlencode([("channel", c) for c in channels])
    extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
    return (
        f"GET /stream?{params} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n{extra}\r\n"
    ).encode()


class SlowReader:
    """A client that opens a stream, reads its preamble, then stops reading.

    Its receive buffer is made tiny before connecting, so the TCP window it
    offers stays small and everything behind it backs up towards the server.
    `host`, `port`: where nginx listens (the published port, or nginx's
    container address, which skips Docker's userland proxy and its megabytes
    of socket buffers).
    """

    def __init__(self, host: str, port: int, channels: Sequence[str], rcvbuf: int = 4096) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        self.sock.sendall(stream_request(port, channels))
        head = b""
        deadline = time.monotonic() + 15
        # Until the id-only position frame: the stream is subscribed then.
        while b"\r\n\r\n" not in head or b"\nid: " not in head.split(b"\r\n\r\n", 1)[1]:
            if time.monotonic() > deadline:
                raise AssertionError(f"the slow client's stream did not start: {head[:300]!r}")
            chunk = self.sock.recv(512)
            if not chunk:
                raise AssertionError(f"the slow client's stream ended at once: {head[:300]!r}")
            head += chunk
        self.status = int(head.split(b" ", 2)[1])
        self.received = len(head)

    def drain(self, timeout: float, limit: int = 64 << 20) -> bool:
        """Read what is left until EOF; True if the connection was closed by the other side."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(1)
        while time.monotonic() < deadline and self.received < limit:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return True  # reset
            if not chunk:
                return True
            self.received += len(chunk)
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def churn_wave(
    port: int,
    requests_: Sequence[bytes],
    *,
    wait_answer: Sequence[bool],
    reset: Sequence[bool],
    timeout: float = 30,
) -> dict[str, int]:
    """Open one connection per request, send it, and vanish without reading.

    Clients with `wait_answer` wait until their answer is readable (the
    stream is attached at the service: its first bytes are sent only then),
    the others hang up right after sending. Hanging up is a RST (SO_LINGER 0)
    for `reset` clients, a plain close otherwise. Returns counts.
    """
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    counts = Counter[str]()
    pending_answers = 0
    for i, request in enumerate(requests_):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if reset[i]:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE, (i, request))
        socks.append(sock)
    deadline = time.monotonic() + timeout
    answered: list[socket.socket] = []
    open_count = len(socks)
    try:
        while open_count and time.monotonic() < deadline:
            for key, mask in selector.select(timeout=0.5):
                sock = socks[key.data[0]]
                i, request = key.data
                if mask & selectors.EVENT_WRITE:
                    try:
                        sock.send(request)
                    except OSError:
                        counts["connect_failed"] += 1
                        selector.unregister(sock)
                        sock.close()
                        open_count -= 1
                        continue
                    if wait_answer[i]:
                        selector.modify(sock, selectors.EVENT_READ, (i, request))
                        pending_answers += 1
                    else:
                        selector.unregister(sock)
                        sock.close()
                        counts["closed_before_answer"] += 1
                        open_count -= 1
                else:
                    selector.unregister(sock)
                    answered.append(sock)
                    open_count -= 1
        counts["answered"] = len(answered)
        counts["no_answer_in_time"] = open_count
        # Everyone who got an answer vanishes at once.
        for sock in answered:
            sock.close()
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        selector.close()
    return dict(counts)


# -- what a stream replica holds ---------------------------------------------------------

# Runs inside a stream container: the worker's resources as the kernel sees them
# (read before the HTTP calls, which open connections themselves), then /stats
# and the herald_stream_clients gauge.
REPLICA_PROBE = r"""
import glob, json, os, urllib.request
states = {}
for path in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        lines = open(path).read().splitlines()[1:]
    except OSError:
        continue
    for line in lines:
        parts = line.split()
        local, remote, state = parts[1], parts[2], parts[3]
        if local.endswith(":1F40"):
            key = "stream_" + {"01": "established", "08": "close_wait"}.get(state, "other")
        elif remote.endswith(":18EB"):
            key = "redis_" + {"01": "established", "08": "close_wait"}.get(state, "other")
        else:
            continue
        states[key] = states.get(key, 0) + 1
fds = 0
for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
    pid = cmdline.split("/")[2]
    try:
        if b"gunicorn" in open(cmdline, "rb").read():
            fds += len(os.listdir("/proc/%s/fd" % pid))
    except OSError:
        pass
def get(path):
    return urllib.request.urlopen("http://127.0.0.1:8000" + path, timeout=5).read().decode()
stats = json.loads(get("/stats"))
metrics = get("/metrics").splitlines()
gauge = sum(float(l.rsplit(" ", 1)[1]) for l in metrics if l.startswith("herald_stream_clients"))
print(json.dumps({"tcp": states, "fds": fds, "stats": stats, "clients_gauge": gauge}))
"""


def probe_replica(stack: Stack, container: str) -> dict[str, Any]:
    """Sockets, file descriptors, /stats and the clients gauge of one stream replica."""
    result: dict[str, Any] = json.loads(stack.docker("exec", container, "python3", "-c", REPLICA_PROBE))
    # Streams that nginx holds over the replica's Unix socket (STREAM_TRANSPORT=unix).
    tcp = result["tcp"]
    tcp["stream_established"] = tcp.get("stream_established", 0) + stack.unix_streams(container)
    return result


# -- memory of a container ----------------------------------------------------------------

# Runs inside a stream container: samples the cgroup's memory and the summed RSS
# of the gunicorn processes (the sampler itself excluded) until its stdin closes.
MEMORY_SAMPLER = r"""
import glob, json, os, select, sys, time
interval, limit = float(sys.argv[1]), float(sys.argv[2])
def cgroup():
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            with open(path) as f:
                return int(f.read())
        except OSError:
            pass
    return 0
def rss():
    total = 0
    for status in glob.glob("/proc/[0-9]*/status"):
        pid = status.split("/")[2]
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if b"gunicorn" not in f.read():
                    continue
            with open(status) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total
samples = []
end = time.monotonic() + limit
print("ready", flush=True)
while time.monotonic() < end:
    samples.append((cgroup(), rss()))
    ready, _, _ = select.select([sys.stdin], [], [], interval)
    if ready and not sys.stdin.read(1):
        break
samples.append((cgroup(), rss()))
print(json.dumps(samples))
"""


class MemorySampler:
    """Samples a container's memory (cgroup usage and gunicorn RSS) until stop()."""

    def __init__(self, container: str, interval: float = 0.2, limit: float = 120) -> None:
        self.container = container
        self.process = subprocess.Popen(
            ["docker", "exec", "-i", container, "python3", "-c", MEMORY_SAMPLER, str(interval), str(limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline().strip()  # waits for the sampler to run
        if first != "ready":
            self.process.kill()
            raise AssertionError(f"memory sampler did not start in {container}: {first!r}")

    def close(self) -> None:
        """Stop sampling without a result (cleanup after a failure)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=30)

    def stop(self) -> dict[str, int]:
        """Before (first sample), peak and after (last sample), in bytes."""
        try:
            out, _err = self.process.communicate(input="", timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        samples = json.loads(out.strip().splitlines()[-1])
        cgroup = [s[0] for s in samples]
        rss = [s[1] for s in samples]
        return {
            "rss_before": rss[0],
            "rss_peak": max(rss),
            "rss_after": rss[-1],
            "cgroup_before": cgroup[0],
            "cgroup_peak": max(cgroup),
            "cgroup_after": cgroup[-1],
            "samples": len(samples),
        }


def mib(value: float) -> float:
    return round(value / (1 << 20), 2)
