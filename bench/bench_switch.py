"""Benchmark the LAN switch (husk.network.switch): frames/s and MB/s through a real switch.

Fake QEMU peers in their own processes: one pumps frames (QEMU's stream framing) as fast
as the switch takes them, the others read and count. Cases: unicast to a learned MAC
(two peers), and broadcast flooded to two receivers (three peers). The sender writes
256 KiB of frames per write (the switch then forwards runs of frames with one send),
and, for small frames, one frame per write as QEMU does (the switch's per-frame cost).
Each case runs for ``--seconds``; the figure is what the receivers got (frames dropped
for a slow receiver are reported, not counted).

    python3 bench/bench_switch.py [--seconds 3] [--sizes 60,1514,9014,65549] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from husk.network import framing
from husk.network.switchclient import SwitchClient, stop_switch

BROADCAST = b"\xff" * 6
SENDER_MAC = bytes.fromhex("0242ac120002")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid``: the switch's cost, whatever else loads the host."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def receiver_mac(n: int) -> bytes:
    return bytes.fromhex("0242ac1200") + bytes([10 + n])


def _pump(sock: socket.socket, chunk: bytes, seconds: float, done: Any) -> None:
    """Send ``chunk`` (whole frames) over and over for ``seconds``; report frames sent."""
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        sock.sendall(chunk)
        rounds += 1
    done.send(rounds)
    sock.close()


def _count(sock: socket.socket, frame_size: int, ready: Any, done: Any) -> None:
    """Read until the sender's side goes quiet; report (frames, bytes, seconds).

    Every frame has the same size, so bytes tell frames without parsing: the reader
    stays faster than the switch and measures it, not itself.
    """
    buffer = bytearray(1 << 20)
    total = 0
    first: float | None = None
    last = time.monotonic()
    sock.settimeout(1.0)
    ready.send(True)
    while True:
        try:
            count = sock.recv_into(buffer)
        except TimeoutError:
            break
        if not count:
            break
        last = time.monotonic()
        if first is None:
            first = last
        total += count
    frames = total // (frame_size + framing.HEADER_SIZE)
    done.send((frames, frames * frame_size, last - (first or last)))


async def _case(
    run_dir: Path, size: int, receivers: int, seconds: float, batch: bool = True
) -> dict[str, Any]:
    client = SwitchClient(run_dir)
    switch_pid = (await client.ensure()).pid
    sender_switch, sender = socket.socketpair()
    await client.add("sender", {1: sender_switch.fileno()}, {1: "bench"})
    sender_switch.close()
    readers: list[socket.socket] = []
    for n in range(receivers):
        switch_end, reader = socket.socketpair()
        await client.add(f"r{n}", {1: switch_end.fileno()}, {1: "bench"})
        switch_end.close()
        readers.append(reader)
        # Let the switch learn the receiver's MAC (its frame is flooded to the sender).
        reader.sendall(framing.frame(BROADCAST + receiver_mac(n) + b"\x88\xb5" + b"hello"))
    await asyncio.sleep(0.2)
    sender.setblocking(True)
    while True:  # drain what the receivers' hellos flooded to the sender
        sender.settimeout(0.1)
        try:
            if not sender.recv(1 << 20):
                break
        except TimeoutError:
            break
    sender.settimeout(None)

    destination = BROADCAST if receivers > 1 else receiver_mac(0)
    frame = framing.frame(destination + SENDER_MAC + b"\x88\xb5" + b"\x5a" * (size - 14))
    per_chunk = max(1, (256 * 1024) // len(frame)) if batch else 1
    chunk = frame * per_chunk

    context = multiprocessing.get_context("fork")
    results = []
    counters = []
    for reader in readers:
        ours, theirs = context.Pipe()
        ready_ours, ready_theirs = context.Pipe()
        process = context.Process(target=_count, args=(reader, size, ready_theirs, theirs))
        process.start()
        ready_ours.recv()
        counters.append((process, ours))
    cpu_before = cpu_seconds(switch_pid)
    sent_ours, sent_theirs = context.Pipe()
    pump = context.Process(target=_pump, args=(sender, chunk, seconds, sent_theirs))
    pump.start()
    rounds = sent_ours.recv()
    pump.join()
    for process, pipe in counters:
        results.append(pipe.recv())
        process.join()
    # Our copies of the peers' sockets kept the ports open until now: their counters.
    stats = await client.stats()
    cpu = cpu_seconds(switch_pid) - cpu_before
    sender.close()
    for reader in readers:
        reader.close()
    await client.remove("sender")
    for n in range(receivers):
        await client.remove(f"r{n}")
    await client.close()

    sent = rounds * per_chunk
    received = sum(r[0] for r in results)
    elapsed = max(r[2] for r in results) or seconds
    dropped = sum(int(v["dropped"]) for k, v in stats.items() if k.startswith("r"))
    return {
        "case": ("unicast" if receivers == 1 else f"flood to {receivers}")
        + ("" if batch else ", 1 frame/write"),
        "frame_bytes": size,
        "sent_frames": sent,
        "received_frames": received,
        "dropped_frames": dropped,
        "switched_in_frames": int(stats["sender/1"]["rx"]),
        "frames_per_s": received / elapsed,
        "mb_per_s": sum(r[1] for r in results) / elapsed / 1e6,
        "sender_frames_per_s": sent / seconds,
        "switch_cpu_s": cpu,
        "cpu_us_per_frame_in": cpu / max(1, int(stats["sender/1"]["rx"])) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sizes", default="60,1514,9014,65549")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="hswb-", dir="/tmp"))
    rows: list[dict[str, Any]] = []
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        cases = [(1, size, True) for size in sizes] + [(2, size, True) for size in sizes]
        cases += [(1, size, False) for size in sizes if size <= 1514]
        for receivers, size, batch in cases:
            rows.append(asyncio.run(_case(run_dir, size, receivers, args.seconds, batch)))
            if not args.json:
                row = rows[-1]
                print(
                    f"{row['case']:<25} {size:>6} B: {row['frames_per_s']:>10,.0f} frames/s "
                    f"{row['mb_per_s']:>8.1f} MB/s  (sent {row['sent_frames']:,}, "
                    f"received {row['received_frames']:,}, dropped {row['dropped_frames']:,}; "
                    f"switch CPU {row['cpu_us_per_frame_in']:.2f} us/frame in)",
                    flush=True,
                )
    finally:
        stop_switch(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
