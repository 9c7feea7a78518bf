"""A stand-in for a running VM that a restarted daemon re-attaches to, with a misbehaving agent.

Run as ``python fake_guest.py STATE_DIR MODE``: it serves QEMU's monitor (just enough
QMP for attach: greeting, capabilities, query-status, quit) on STATE_DIR/qmp.sock and
the guest agent's port on STATE_DIR/agent.sock, prints "ready", and serves until killed.
The test writes STATE_DIR/machine.json naming this process, as QEMU's would.

MODE is what the agent does wrong:

- ``bad-ready``: answers HELLO with a READY whose session list holds a number.
- ``bad-exited``: a well-formed READY naming a workload on channel 1, then some
  output and an EXITED report whose code is a string.
- ``bad-top``: a well-formed READY naming a workload that runs on; a process list
  (STATS with processes) whose entries are numbers.
- ``vm-events``: a healthy agent; the "hypervisor" reports a host read error on the
  writable disk (BLOCK_IO_ERROR, action report) 2 s after the monitor connected, and
  stops the VM on an internal error (STOP; query-status says "internal-error") 2 s later.

Frames are built by hand (u32 length | u8 type | u32 channel | payload) so the
fake depends on no husk code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
from typing import Any

HEADER = struct.Struct(">IBI")
HELLO, READY, STDOUT, EXITED, STATS = 1, 2, 6, 9, 17
OUTPUT = b"hello from the fake guest\n"


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind, channel) + payload


def json_frame(kind: int, channel: int, body: Any) -> bytes:
    return frame(kind, channel, json.dumps(body).encode())


async def serve_agent(
    mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            length, kind, channel = HEADER.unpack(await reader.readexactly(HEADER.size))
            await reader.readexactly(length)
            if kind == STATS and mode == "bad-top":
                writer.write(json_frame(STATS, channel, {"processes": [1, 2]}))
            elif kind != HELLO:
                continue  # whatever else the host asks goes unanswered
            elif mode == "bad-ready":
                writer.write(json_frame(READY, 0, {"version": 1, "sessions": [1]}))
            else:
                session = {"kind": "run", "channel": 1, "pid": 42}
                writer.write(json_frame(READY, 0, {"version": 1, "sessions": [session]}))
                if mode == "bad-exited":
                    await writer.drain()
                    await asyncio.sleep(1.0)  # the host has taken the session over by now
                    writer.write(frame(STDOUT, 1, OUTPUT))
                    writer.write(json_frame(EXITED, 1, {"code": "zero"}))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


RUN_STATE = {"status": "running"}


async def hypervisor_events(writer: asyncio.StreamWriter) -> None:
    def event(name: str, data: dict[str, Any]) -> bytes:
        stamp = {"seconds": 0, "microseconds": 0}
        return json.dumps({"event": name, "data": data, "timestamp": stamp}).encode() + b"\r\n"

    await asyncio.sleep(2.0)
    failure = {
        "device": "disk1",
        "node-name": "disk1-format",
        "operation": "read",
        "action": "report",
        "nospace": False,
        "reason": "Input/output error",
    }
    writer.write(event("BLOCK_IO_ERROR", failure))
    await asyncio.sleep(2.0)
    RUN_STATE["status"] = "internal-error"
    writer.write(event("STOP", {}))
    await writer.drain()


async def serve_qmp(mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    greeting = {
        "QMP": {
            "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
            "capabilities": [],
        }
    }
    writer.write(json.dumps(greeting).encode() + b"\r\n")
    await writer.drain()
    if mode == "vm-events":
        asyncio.get_running_loop().create_task(hypervisor_events(writer))
    decoder = json.JSONDecoder()
    buffer = ""
    try:
        # QMP clients send JSON objects back to back, with no line breaks.
        while data := await reader.read(4096):
            buffer += data.decode()
            while buffer.strip():
                try:
                    message, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break  # incomplete: wait for more
                buffer = buffer.lstrip()[end:]
                await answer_qmp(message, writer)
    except ConnectionError:
        pass
    finally:
        writer.close()


async def answer_qmp(message: dict[str, Any], writer: asyncio.StreamWriter) -> None:
    command = message.get("execute")
    result: dict[str, Any] = {}
    if command == "query-status":
        status = RUN_STATE["status"]
        result = {"status": status, "running": status == "running", "singlestep": False}
    reply: dict[str, Any] = {"return": result}
    if "id" in message:
        reply["id"] = message["id"]
    writer.write(json.dumps(reply).encode() + b"\r\n")
    await writer.drain()
    if command == "quit":
        os._exit(0)


def listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(4)
    return sock


async def main(state_dir: str, mode: str) -> None:
    agent = await asyncio.start_unix_server(
        lambda r, w: serve_agent(mode, r, w), sock=listen(os.path.join(state_dir, "agent.sock"))
    )
    qmp = await asyncio.start_unix_server(
        lambda r, w: serve_qmp(mode, r, w), sock=listen(os.path.join(state_dir, "qmp.sock"))
    )
    print("ready", flush=True)
    async with agent, qmp:
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
