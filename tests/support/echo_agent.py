"""A test agent on `spoe`: it echoes what HAProxy sent back as transaction variables, so an HTTP
test can read them in response headers and check the whole path HAProxy -> SPOP -> engine -> ACK ->
HAProxy variables.

    python -m tests.support.echo_agent --port N [--max-frame-size N] [--capability X ...]
                                       [--async-delay S] [--wire-log]

For each "check" message it sets txn vars `method`, `path`, `body_len` (int), `seen` (the sorted arg
names, comma-joined); for each "types" or "types-res" message, a variable of every data type in
every scope and an unset-var (`every_action`). Other messages are ACKed without actions. With
`--async-delay S` the handler is a coroutine that answers after a random delay of up to S seconds,
so ACKs leave out of order.

Logs are JSON lines on stderr, at debug level so the engine's own `spop.hello` lines (negotiated
capabilities, health check flag) are there. With `--wire-log` HAProxy connects to a relay on
`--port` that forwards bytes unchanged to the agent on a private port and logs every frame header it
sees in each direction (and the items of HELLO and DISCONNECT frames): that is how the tests observe
what HAProxy itself announces and whether it really fragments, without reaching into the engine.
On SIGTERM or SIGINT the agent stops gracefully and logs its `AgentStats` as `echo.stats`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import logging
import random
import signal
import sys
from typing import Any

import structlog

import spoe
from spoe.connection import CAPABILITIES
from spoe.data import UINT32_BE
from spoe.frames import Frame, FrameType, decode_frame, decode_kv_list

log = structlog.get_logger("echo_agent")
KV_FRAMES = {
    FrameType.HAPROXY_HELLO,
    FrameType.AGENT_HELLO,
    FrameType.HAPROXY_DISCONNECT,
    FrameType.AGENT_DISCONNECT,
}


def echo_actions(message: spoe.Message) -> list[spoe.SetVar]:
    args = message.args
    body = args.get("body")
    return [
        spoe.SetVar(spoe.VarScope.TRANSACTION, "method", str(args.get("method"))),
        spoe.SetVar(spoe.VarScope.TRANSACTION, "path", str(args.get("path"))),
        spoe.SetVar(spoe.VarScope.TRANSACTION, "body_len", len(body) if body is not None else 0),
        spoe.SetVar(spoe.VarScope.TRANSACTION, "seen", ",".join(sorted(args))),
    ]


def every_action(message: spoe.Message) -> list[spoe.SetVar | spoe.UnsetVar]:
    """For a "types" message: a variable of each data type, in each scope, and an unset-var after
    a set-var of the same variable (tests/test_oracle.py reads them back from HAProxy)."""
    scope = spoe.VarScope
    return [
        spoe.SetVar(scope.PROCESS, "proc_str", "in proc"),
        spoe.SetVar(scope.SESSION, "sess_true", True),
        spoe.SetVar(scope.TRANSACTION, "txn_false", False),
        spoe.SetVar(scope.REQUEST, "req_int32", spoe.Int32(-1)),
        spoe.SetVar(scope.RESPONSE, "res_uint32", spoe.Uint32(4294967295)),
        spoe.SetVar(scope.TRANSACTION, "int64", spoe.Int64(-9007199254740993)),
        spoe.SetVar(scope.TRANSACTION, "uint64", spoe.Uint64(2**63 - 1)),
        spoe.SetVar(scope.TRANSACTION, "ipv4", ipaddress.IPv4Address("192.0.2.1")),
        spoe.SetVar(scope.TRANSACTION, "ipv6", ipaddress.IPv6Address("2001:db8::1")),
        spoe.SetVar(scope.TRANSACTION, "null", None),
        spoe.SetVar(scope.TRANSACTION, "binary", b"\x00\xff"),
        spoe.SetVar(scope.TRANSACTION, "string", "caf\u00e9"),
        spoe.SetVar(scope.TRANSACTION, "gone", "set, then unset"),
        spoe.UnsetVar(scope.TRANSACTION, "gone"),
    ]


def build_agent(max_frame_size: int, capabilities: list[str] | None, async_delay: float) -> spoe.Agent:
    options: dict[str, Any] = {"max_frame_size": max_frame_size}
    if capabilities is not None:
        options["capabilities"] = capabilities
    agent = spoe.Agent(**options)
    if async_delay > 0:

        @agent.handler("check")
        async def check_later(message: spoe.Message) -> list[spoe.SetVar]:
            # A random delay, so that ACKs of pipelined NOTIFYs leave out of order.
            await asyncio.sleep(random.uniform(0, async_delay))
            return echo_actions(message)

    else:
        agent.add_handler("check", echo_actions)
    agent.add_handler("types", every_action)
    agent.add_handler("types-res", every_action)
    return agent


class FrameTap:
    """Splits one direction of an SPOP byte stream into frames and logs each header."""

    def __init__(self, connection: int, direction: str) -> None:
        self.connection = connection
        self.direction = direction
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            length = UINT32_BE.unpack_from(self.buffer)[0]
            if len(self.buffer) < 4 + length:
                return
            frame = decode_frame(bytes(self.buffer[4 : 4 + length]))
            del self.buffer[: 4 + length]
            self.log(frame, length)

    def log(self, frame: Frame, length: int) -> None:
        try:
            type_name = FrameType(frame.type).name
        except ValueError:
            type_name = str(frame.type)
        fields: dict[str, Any] = {}
        if frame.type in KV_FRAMES:
            fields["items"] = {key: _jsonable(value) for key, value in decode_kv_list(frame.payload).items()}
        log.info(
            "wire.frame",
            conn=self.connection,
            dir=self.direction,
            type=type_name,
            fin=frame.fin,
            abort=frame.abort,
            stream_id=frame.stream_id,
            frame_id=frame.frame_id,
            length=length,
            **fields,
        )


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


async def relay(host: str, port: int, upstream_port: int) -> asyncio.base_events.Server:
    """Listen on host:port; pipe every connection to the agent on upstream_port, tapping both ways."""
    numbers = itertools.count(1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tap: FrameTap) -> None:
        try:
            while data := await reader.read(65536):
                tap.feed(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        # RuntimeError: uvloop's write_eof on a transport the other side has just reset (HAProxy 3.x).
        except (ConnectionError, OSError, RuntimeError):
            writer.close()

    async def serve(haproxy_reader: asyncio.StreamReader, haproxy_writer: asyncio.StreamWriter) -> None:
        number = next(numbers)
        try:
            agent_reader, agent_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:  # the agent is stopping: HAProxy sees the connection close, as it would
            haproxy_writer.close()
            return
        await asyncio.gather(
            pipe(haproxy_reader, agent_writer, FrameTap(number, "haproxy>agent")),
            pipe(agent_reader, haproxy_writer, FrameTap(number, "agent>haproxy")),
        )
        haproxy_writer.close()
        agent_writer.close()

    return await asyncio.start_server(serve, host, port)


async def main(args: argparse.Namespace) -> None:
    agent = build_agent(args.max_frame_size, args.capability, args.async_delay)
    servers = []
    if args.wire_log:
        (_, agent_port), *_ = await agent.start("127.0.0.1", 0)
        servers.append(await relay(args.host, args.port, agent_port))
    else:
        await agent.start(args.host, args.port)
    log.info(
        "echo.listening",
        port=args.port,
        capabilities=sorted(agent.capabilities),
        max_frame_size=agent.max_frame_size,
        wire_log=args.wire_log,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()
    await agent.stop(timeout=2.0)
    log.info("echo.stats", **vars(agent.stats))


def configure_logging() -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-frame-size", type=int, default=16384)
    parser.add_argument(
        "--capability",
        nargs="*",
        choices=sorted(CAPABILITIES),
        help="capabilities to announce (default: all the engine knows; none if given without values)",
    )
    parser.add_argument(
        "--async-delay",
        type=float,
        default=0.0,
        help="answer from a coroutine handler after a random delay of up to this many seconds",
    )
    parser.add_argument("--wire-log", action="store_true", help="log every frame through a relay")
    return parser.parse_args(argv)


if __name__ == "__main__":
    configure_logging()
    spoe.run(main(parse_args()))
