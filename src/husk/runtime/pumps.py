"""Copying between a host stream and a guest tunnel, both ways: one pair of pumps for
published ports and unix-socket binds alike."""

from __future__ import annotations

import asyncio

from husk.agent.client import Tunnel
from husk.errors import GuestError

CHUNK = 64 * 1024


async def pump_to_guest(reader: asyncio.StreamReader, tunnel: Tunnel) -> None:
    """The host side's bytes into the tunnel; its end of stream as the tunnel's EOF."""
    try:
        while data := await reader.read(CHUNK):
            await tunnel.send(data)
    except (OSError, GuestError):
        pass
    finally:
        await tunnel.send_eof()


async def pump_to_host(tunnel: Tunnel, writer: asyncio.StreamWriter) -> None:
    """The guest's bytes to the host side, then a half-close where the transport has one."""
    try:
        while data := await tunnel.receive():
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, GuestError):  # the host side went away (ENOTCONN is not a ConnectionError)
        pass
