"""Many SSE streams from one process, for the capacity test (tests/e2e/test_capacity.py).

Run as `python -m tests.e2e.capacity_client --port P --streams N --channel C --marker M`,
typically inside nginx's network namespace (nsenter), so that Docker's userland
proxy for the published port is not what is measured. It talks JSON lines:

1. opens N streams to 127.0.0.1:P (bounded concurrency), each live once its
   id-only position frame arrived, and prints {"opened": n, "failed": {...}};
2. waits for a line on stdin (the test published an event after that);
3. waits, until --timeout, for an event carrying M on every stream, and prints
   {"received": n, "missing": m}; then closes every stream.

asyncio on raw sockets: 5,000 streams cost this process little CPU and memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter


class Stream:
    """One open stream: its reader and writer, and whether the marker arrived."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.got_marker = False


async def open_stream(port: int, path: str, deadline: float) -> Stream:
    """Connect, send the request, and read up to the stream's position frame."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: herald\r\nAccept: text/event-stream\r\n\r\n".encode())
    status = await asyncio.wait_for(reader.readline(), deadline - time.monotonic())
    if b" 200 " not in status:
        writer.close()
        raise ConnectionError(status.decode(errors="replace").strip() or "no answer")
    while b"id: " not in (line := await asyncio.wait_for(reader.readline(), deadline - time.monotonic())):
        if not line:
            raise ConnectionError("closed before the position frame")
    return Stream(reader, writer)


async def wait_marker(stream: Stream, marker: bytes, deadline: float) -> None:
    """Read until a line carrying `marker` (chunk framing and all: a substring test)."""
    try:
        while not stream.got_marker:
            line = await asyncio.wait_for(stream.reader.readline(), deadline - time.monotonic())
            if not line:
                return
            stream.got_marker = marker in line
    except (TimeoutError, OSError):
        return


async def run(args: argparse.Namespace) -> None:
    path = f"/stream?channel={args.channel}"
    deadline = time.monotonic() + args.timeout
    gate = asyncio.Semaphore(args.concurrency)
    failed: Counter[str] = Counter()

    async def one() -> Stream | None:
        async with gate:
            try:
                return await open_stream(args.port, path, deadline)
            except (OSError, TimeoutError) as exc:
                failed[str(exc)[:120] or type(exc).__name__] += 1
                return None

    opened = [s for s in await asyncio.gather(*(one() for _ in range(args.streams))) if s]
    emit({"opened": len(opened), "failed": dict(failed)})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    marker = args.marker.encode()
    deadline = time.monotonic() + args.timeout
    await asyncio.gather(*(wait_marker(s, marker, deadline) for s in opened))
    received = sum(s.got_marker for s in opened)
    emit({"received": received, "missing": len(opened) - received})
    for s in opened:
        s.writer.close()
    await asyncio.sleep(0.5)  # let the FINs go out before the process ends


def emit(message: dict[str, object]) -> None:
    print(json.dumps(message), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    # Every stream is one open file here: raise the soft limit to the hard one.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
