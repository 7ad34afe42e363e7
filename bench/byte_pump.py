"""The floor for `bench/proxy_sse.py`: the least a Python relay can do per SSE event.

A uvloop `asyncio.Protocol` pair per client connection that copies bytes both ways without
looking at them: no HTTP parsing, no routing, no metrics. Its CPU per relayed event is what
any Python proxy in front of vLLM pays on this machine (an epoll wakeup, one `recv`, one
`send`, two callbacks), so the proxy's own figure is read against it.

    python -m bench.byte_pump --upstream 127.0.0.1:PORT --port PORT
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop


class _Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.early: list[bytes] = []
        self.upstream: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        up, _ = await loop.create_connection(
            lambda: _Upstream(self.transport),  # type: ignore[arg-type]
            self.host,
            self.port,
        )
        self.upstream = up
        for data in self.early:
            up.write(data)  # type: ignore[attr-defined]
        self.early = []

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def serve(upstream: str, port: int) -> None:
    host, up_port = upstream.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Client(host, int(up_port)), "127.0.0.1", port, backlog=1024
    )  # as the server's public port: a wave of new streams must not overflow the SYN queue
    await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--upstream", required=True, help="host:port of the stand-in")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    uvloop.run(serve(args.upstream, args.port))


if __name__ == "__main__":
    main()
