"""The bench's clients: a minimal keep-alive HTTP client and SSE subscriber processes.

Subscribers must cost less CPU than the server they measure, so they are
asyncio Protocols on raw sockets with just enough parsing: the HTTP status,
chunked transfer coding, SSE frames split on blank lines, and for each event
its id, its type and its data `[index, publish_time]` (the bench publishes
that array; the publisher stores it as compact JSON). Every subscriber checks
its own events on the fly: indexes 0, 1, 2... each exactly once, ids
strictly increasing. Connections are spread over several processes
(multiprocessing, spawn), each driven through a Pipe by the bench.

The same subscribers read nchan's EventSource streams (the bench's reference,
tests.load.nchan) when opened with dialect "nchan": there the body is not
chunked (it ends with the connection), the stream is live at nchan's first
comment (`: hi`), an event has no `event:` line and its id is
`<unix time>:<tag>` (tag counting within that second), compared as that pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from tests.load.netns import tcp_socket
from tests.load.stack import cpu_seconds, raise_nofile

Address = tuple[str, int]

# -- HTTP/1.1 keep-alive client (publishing, /stats) ------------------------------------


class HttpError(Exception):
    pass


async def connect(address: Address, netns: str | None) -> socket.socket:
    """A TCP socket connected to `address`, created in the network namespace `netns` (None: ours)."""
    sock = tcp_socket(netns)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to host:port; reconnects when the server closes.

    `netns`: the network namespace to connect from (a container's; None for ours).
    """

    def __init__(
        self, port: int, timeout: float = 10, host: str = "127.0.0.1", netns: str | None = None
    ) -> None:
        self.address = (host, port)
        self.netns = netns
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connects = 0

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            sock = await connect(self.address, self.netns)
            self._reader, self._writer = await asyncio.open_connection(sock=sock)
            self.connects += 1
        return self._reader, self._writer

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        data = head.encode() + b"\r\n" + body
        while True:
            reused = self._reader is not None
            reader, writer = await self._open()
            try:
                writer.write(data)
                return await asyncio.wait_for(self._answer(reader), self.timeout)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                self.close()
                if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                    raise HttpError(f"{method} {path}: {exc!r}") from exc
                # A keep-alive connection the server had closed: once more on a new one.

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at < 0:
            raise HttpError(f"answer without Content-Length: {head!r}")
        end = lower.index(b"\r\n", at + 2)
        body = await reader.readexactly(int(lower[at + 17 : end]))
        if b"\r\nconnection: close" in lower:
            self.close()
        return status, body

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        return await self.request("POST", path, body)

    async def get(self, path: str) -> tuple[int, bytes]:
        return await self.request("GET", path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


# -- SSE subscribers ----------------------------------------------------------------------


class Subscriber(asyncio.Protocol):
    """One SSE stream; checks its events as they arrive."""

    __slots__ = (
        "chunk_left",
        "crlf_left",
        "errors",
        "head",
        "headers_done",
        "last_seq",
        "nchan",
        "next_index",
        "owner",
        "pending",
        "raw",
        "request",
        "settled",
        "status",
        "transport",
    )

    def __init__(self, owner: Worker, request: bytes, nchan: bool = False) -> None:
        self.owner = owner
        self.request = request
        self.nchan = nchan  # nchan's EventSource dialect (see the module's docstring)
        self.transport: asyncio.Transport | None = None
        self.raw = b""  # undecoded bytes (an incomplete chunk-size line or headers)
        self.headers_done = False
        self.status = 0
        self.chunk_left = 0  # data bytes left in the current chunk
        self.crlf_left = 0  # bytes of the CRLF after the current chunk not yet seen
        self.pending = b""  # decoded bytes of an incomplete SSE frame
        self.head: bytes | None = None  # the id-only frame: the stream is live
        self.settled = False  # live, or failed to become live
        self.next_index = 0
        self.last_seq = 0
        self.errors = 0

    def itself(self) -> Subscriber:
        """The protocol factory for this connection."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.owner.lost(self)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.raw:
            data = self.raw + data
            self.raw = b""
        pos = 0
        if not self.headers_done:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.raw = data
                return
            self.status = int(data[9:12])
            self.headers_done = True
            framing = b"text/event-stream" if self.nchan else b"chunked"
            if self.status != 200 or framing not in data[:end].lower():
                self.owner.failed(self)
                return
            pos = end + 4
        if self.nchan:  # not chunked: the body runs until the connection ends
            if pos < len(data):
                self._frames(data[pos:], now)
            return
        body = []
        size = len(data)
        while pos < size:
            if self.crlf_left:
                take = min(self.crlf_left, size - pos)
                self.crlf_left -= take
                pos += take
                continue
            if self.chunk_left == 0:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self.raw = data[pos:]
                    break
                length = int(data[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if length == 0:
                    break  # the last chunk: the server ended the stream
                self.chunk_left = length
            take = min(self.chunk_left, size - pos)
            body.append(data[pos : pos + take])
            pos += take
            self.chunk_left -= take
            if self.chunk_left == 0:
                self.crlf_left = 2
        if body:
            self._frames(b"".join(body), now)

    def _frames(self, text: bytes, now: float) -> None:
        if self.pending:
            text = self.pending + text
        frames = text.split(b"\n\n")
        self.pending = frames.pop()
        events = 0
        for frame in frames:
            if frame[:1] == b":" or frame[:6] == b"retry:":
                if self.nchan and self.head is None:  # nchan's ": hi": subscribed
                    self.head = frame
                    self.owner.live(self)
                continue  # ": ok", heartbeats, "retry: 3000"
            data_at = frame.find(b"\ndata: ")
            if data_at < 0:
                if frame[:4] == b"id: " and self.head is None:
                    self.head = frame[4:]
                    self.owner.live(self)
                continue
            self._event(frame, data_at, now)
            events += 1
        if events:
            self.owner.reads += 1  # reads that brought events: received / reads = batching

    def _event(self, frame: bytes, data_at: int, now: float) -> None:
        try:
            nl = frame.index(b"\n")
            if self.nchan:
                if frame[:4] != b"id: ":
                    raise ValueError("no id")
                seconds, _, tag = frame[4:nl].partition(b":")
                seq = int(seconds) << 32 | int(tag)  # <time>:<tag> ordered as the pair
            else:
                seq = int(frame[frame.rindex(b"-", 0, nl) + 1 : nl])
                if not frame.startswith(b"event: message\n", nl + 1):
                    raise ValueError("not a message event")  # a reset would be an error here
            payload = frame[data_at + 7 :]
            comma = payload.index(b",")
            index = int(payload[1:comma])
            sent = float(payload[comma + 1 : -1])
        except ValueError:
            self.errors += 1
            return
        if index != self.next_index or seq <= self.last_seq:
            self.errors += 1  # a gap, a duplicate or out of order
        self.last_seq = seq
        self.next_index = index + 1
        owner = self.owner
        owner.latencies.append(now - sent)
        owner.indexes.append(index)
        owner.received += 1
        if self.next_index == owner.expected and not self.errors:
            owner.finished(now)


@dataclass
class Worker:
    """One client process's connections and tallies."""

    pipe: Connection
    subs: list[Subscriber] = field(default_factory=list)
    latencies: array[float] = field(default_factory=lambda: array("d"))
    indexes: array[int] = field(default_factory=lambda: array("i"))  # the event of each latency
    expected: int = -1
    received: int = 0
    reads: int = 0
    done: int = 0
    last_event_at: float = 0.0
    settled: int = 0
    live_count: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    lost_count: int = 0
    all_settled: asyncio.Event = field(default_factory=asyncio.Event)
    all_done: asyncio.Event = field(default_factory=asyncio.Event)
    slots: asyncio.Semaphore | None = None

    # Callbacks from the subscribers.

    def live(self, sub: Subscriber) -> None:
        self.live_count += 1
        self._settle(sub)

    def failed(self, sub: Subscriber) -> None:
        self._fail(sub, f"status {sub.status}")
        if sub.transport is not None:
            sub.transport.close()

    def lost(self, sub: Subscriber) -> None:
        self.lost_count += 1
        self._fail(sub, "closed before live")

    def finished(self, now: float) -> None:
        self.done += 1
        self.last_event_at = max(self.last_event_at, now)
        if self.done >= self.live_count:
            self.all_done.set()

    def _fail(self, sub: Subscriber, why: str) -> None:
        if not sub.settled:
            self.failures[why] = self.failures.get(why, 0) + 1
            self._settle(sub)

    def _settle(self, sub: Subscriber) -> None:
        if sub.settled:
            return
        sub.settled = True
        self.settled += 1
        if self.slots is not None:
            self.slots.release()
        if self.settled >= len(self.subs):
            self.all_settled.set()

    # Commands from the bench.

    async def open(
        self,
        address: Address,
        netns: str | None,
        paths: list[str],
        concurrency: int,
        timeout: float,
        dialect: str = "herald",
    ) -> dict[str, Any]:
        """Open one stream per path at `address` (from the network namespace `netns`).

        `dialect`: "herald", or "nchan" for the reference (see the module's docstring).
        """
        loop = asyncio.get_running_loop()
        self.subs = []
        self.settled = self.live_count = self.lost_count = 0
        self.failures = {}
        self.all_settled = asyncio.Event()
        self.slots = asyncio.Semaphore(concurrency)
        deadline = loop.time() + timeout
        started = time.monotonic()
        for path in paths:
            request = (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
            ).encode()
            sub = Subscriber(self, request, nchan=dialect == "nchan")
            try:
                await asyncio.wait_for(self.slots.acquire(), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                break
            self.subs.append(sub)
            try:
                await loop.create_connection(sub.itself, sock=await connect(address, netns))
            except OSError as exc:
                self._fail(sub, f"connect: {exc.strerror or exc!r}")
        # Set early if, while connecting, every stream so far had settled: start over.
        self.all_settled = asyncio.Event()
        if self.settled >= len(self.subs):
            self.all_settled.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_settled.wait(), max(deadline - loop.time(), 0.001))
        heads = {sub.head for sub in self.subs if sub.head is not None}
        return {
            "requested": len(paths),
            "live": self.live_count,
            "failures": self.failures,
            "seconds": time.monotonic() - started,
            "heads": sorted(h.decode() for h in heads)[:4],
        }

    def expect(self, count: int) -> None:
        """From now on, each stream should get events 0..count-1."""
        self.expected = count
        self.latencies = array("d")
        self.indexes = array("i")
        self.received = self.done = self.reads = 0
        self.last_event_at = 0.0
        self.all_done = asyncio.Event()
        for sub in self.subs:
            sub.next_index = 0
            sub.errors = 0
            sub.last_seq = 0
        if count == 0 or not self.live_count:
            self.all_done.set()

    async def collect(self, timeout: float) -> dict[str, Any]:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_done.wait(), timeout)
        live = [s for s in self.subs if s.head is not None]
        complete = sum(1 for s in live if s.next_index == self.expected and not s.errors)
        return {
            "streams": len(live),
            "complete": complete,
            "errors": sum(s.errors for s in live),
            "received": self.received,
            "reads": self.reads,
            "expected_each": self.expected,
            "closed_early": sum(1 for s in live if s.transport is None),
            "last_event_at": self.last_event_at,
            "latencies": self.latencies.tobytes(),
            "indexes": self.indexes.tobytes(),
        }

    async def close(self, timeout: float) -> dict[str, Any]:
        for sub in self.subs:
            if sub.transport is not None:
                sub.transport.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(s.transport is not None for s in self.subs) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for sub in self.subs:
            if sub.transport is not None:
                sub.transport.abort()
        count = len(self.subs)
        self.subs = []
        return {"closed": count}

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Any] = asyncio.Queue()

        def readable() -> None:
            try:
                inbox.put_nowait(self.pipe.recv())
            except EOFError:
                loop.remove_reader(self.pipe.fileno())
                inbox.put_nowait({"op": "exit"})

        loop.add_reader(self.pipe.fileno(), readable)
        while True:
            command = await inbox.get()
            op = command["op"]
            if op == "exit":
                await self.close(2)
                return
            if op == "open":
                host, port = command["address"]
                answer = await self.open(
                    (host, port),
                    command.get("netns"),
                    command["paths"],
                    command["concurrency"],
                    command["timeout"],
                    command.get("dialect", "herald"),
                )
            elif op == "expect":
                self.expect(command["count"])
                answer = {"ok": True}
            elif op == "collect":
                answer = await self.collect(command["timeout"])
            elif op == "close":
                answer = await self.close(command.get("timeout", 10))
            elif op == "cpu":
                answer = {"cpu": cpu_seconds([os.getpid()])}
            else:
                answer = {"error": f"unknown command {op!r}"}
            self.pipe.send(answer)


def worker_main(pipe: Connection) -> None:
    """Entry point of a client process."""
    raise_nofile()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C reaches the whole group: the bench stops us
        asyncio.run(Worker(pipe).serve())


class ClientPool:
    """The bench's side of the client processes."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes: list[Any] = []
        for _ in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(target=worker_main, args=(theirs,), daemon=True)
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    async def call(self, commands: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        """Send one command to each process (in order) and wait for every answer."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        for pipe, command in zip(self.pipes, commands, strict=False):
            future: asyncio.Future[Any] = loop.create_future()
            futures.append(future)

            def readable(pipe: Connection = pipe, future: asyncio.Future[Any] = future) -> None:
                loop.remove_reader(pipe.fileno())
                try:
                    future.set_result(pipe.recv())
                except EOFError as exc:
                    future.set_exception(RuntimeError(f"a client process died: {exc!r}"))

            loop.add_reader(pipe.fileno(), readable)
            pipe.send(command)
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), timeout))
        finally:
            for pipe in self.pipes:
                loop.remove_reader(pipe.fileno())

    async def broadcast(self, command: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        return await self.call([command] * len(self.pipes), timeout)

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send({"op": "exit"})
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
