"""A guest reaches the network, but never the loopback of the host it runs on.

Everything here happens inside two network namespaces the test creates (never in
the host's): ``A`` holds the husk runtime (so A's loopback plays the host's) and
``B``, linked to A by a veth pair on 192.0.2.0/24 (TEST-NET-1), holds an HTTP
server and a DNS server. A has no default route: no packet can leave the machine.

* Loopback: a guest connecting (TCP and UDP) to every address of QEMU's user
  network (10.0.2.0/24, whose addresses but the DNS alias QEMU 7.2 maps to the
  loopback of its namespace) and of slirp4netns's (10.0.3.0/24), on a port a
  listener holds on A's 127.0.0.1, reaches nothing.
* Egress: the guest fetches from B's server by IP, and by a name that B's DNS
  server answers (guest -> 10.0.2.3 -> slirp4netns -> A's resolv.conf -> B).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]

IMAGE = "husk.local/busybox:latest"
HOST_A = "192.0.2.1"
HOST_B = "192.0.2.2"
HTTP_PORT = 8080
NAME = "egress.test"
REPLY = "egress-reached-B"

SERVER = textwrap.dedent(
    """
    import socket, struct, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    address, port, name, reply = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = reply.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    def answer(query):
        end = 12
        labels = []
        while query[end]:
            labels.append(query[end + 1 : end + 1 + query[end]].decode())
            end += query[end] + 1
        qtype = struct.unpack("!H", query[end + 1 : end + 3])[0]
        question = query[12 : end + 5]
        found = ".".join(labels).lower() == name
        header = query[:2] + (b"\\x81\\x80" if found else b"\\x81\\x83") + b"\\x00\\x01"
        if found and qtype == 1:
            record = b"\\xc0\\x0c\\x00\\x01\\x00\\x01" + struct.pack("!IH", 60, 4)
            counts = b"\\x00\\x01\\x00\\x00\\x00\\x00"
            return header + counts + question + record + socket.inet_aton(address)
        return header + b"\\x00\\x00\\x00\\x00\\x00\\x00" + question

    def dns():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, 53))
        while True:
            query, peer = sock.recvfrom(512)
            try:
                sock.sendto(answer(query), peer)
            except Exception:
                pass

    threading.Thread(target=dns, daemon=True).start()
    server = ThreadingHTTPServer((address, port), Handler)
    print("ready", flush=True)
    server.serve_forever()
    """
)

# Runs in namespace A: listeners on A's loopback, then one container probing.
PROBE = textwrap.dedent(
    """
    import asyncio, json, socket, sys, threading
    from husk.runtime.runtime import Runtime
    from husk.spec import ContainerSpec

    image, script_port = sys.argv[1], None
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(64)
    port = tcp.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    reached = []

    def accept():
        while True:
            conn, peer = tcp.accept()
            reached.append(["tcp", peer[0]])
            conn.close()

    def receive():
        while True:
            data, peer = udp.recvfrom(1024)
            reached.append(["udp", data.decode(errors="replace")])

    threading.Thread(target=accept, daemon=True).start()
    threading.Thread(target=receive, daemon=True).start()
    script = sys.argv[2].replace("PORT", str(port))

    async def main():
        runtime = Runtime()
        record = await runtime.create(ContainerSpec(image=image, cmd=["sh", "-c", script]))
        try:
            await runtime.start(record.id)
            code = await asyncio.wait_for(runtime.wait(record.id), 300)
            logs = "".join([e.data.decode() async for e in runtime.logs(record.id)])
        finally:
            await runtime.remove(record.id, force=True)
            await runtime.shutdown()
        return code, logs

    code, logs = asyncio.run(main())
    print(json.dumps({"code": code, "logs": logs, "reached": reached, "port": port}))
    """
)

# Every address of both subnets at once: TCP with nc (a connection that opens is
# reported) and UDP with tftp (one datagram naming the address), each given 2 s (tftp is
# ended once every nc has had its 2 s). Addresses nothing answers ARP for time out inside
# the guest. One process per probe, none for its bookkeeping: under TCG the guest's time
# goes into starting processes.
GUEST_SCRIPT = textwrap.dedent(
    f"""
    for net in 10.0.2 10.0.3; do
      tcp=""
      udp=""
      i=1
      while [ $i -le 254 ]; do
        nc -w 2 $net.$i PORT </dev/null >/dev/null 2>&1 &
        tcp="$tcp $!:$net.$i"
        tftp -g -r "udp-$net.$i" -l /dev/null $net.$i PORT >/dev/null 2>&1 &
        udp="$udp $!"
        i=$((i + 1))
      done
      for job in $tcp; do
        if wait ${{job%%:*}}; then echo "tcp-open ${{job#*:}}"; fi
      done
      kill $udp 2>/dev/null
      wait
    done
    echo "by-ip $(wget -qO- http://{HOST_B}:{HTTP_PORT}/ 2>&1)"
    echo "by-name $(wget -qO- http://{NAME}:{HTTP_PORT}/ 2>&1)"
    echo probed
    """
)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """Namespaces A and B joined by a veth pair; A's resolv.conf names B's DNS server."""
    token = secrets.token_hex(3)
    a, b = f"husk-test-a-{token}", f"husk-test-b-{token}"
    etc = Path("/etc/netns") / a
    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        # Created inside A, the far end moved straight into B: the host's namespace
        # never holds either end.
        ip("-n", a, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b", "netns", b)
        for namespace, device, address in ((a, "veth-a", HOST_A), (b, "veth-b", HOST_B)):
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            ip("-n", namespace, "link", "set", device, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text(f"nameserver {HOST_B}\n")
        yield a, b
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        for namespace in (a, b):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


@pytest.mark.timeout(600)
def test_guest_reaches_the_network_but_not_the_hosts_loopback(
    busybox_image: str, namespaces: tuple[str, str], tmp_path: Path
) -> None:
    a, b = namespaces
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "probe.py").write_text(PROBE)
    server = subprocess.Popen(
        ["ip", "netns", "exec", b, sys.executable, str(tmp_path / "server.py"),
         HOST_B, str(HTTP_PORT), NAME, REPLY],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        result = subprocess.run(
            ["ip", "netns", "exec", a, sys.executable, str(tmp_path / "probe.py"),
             busybox_image, GUEST_SCRIPT],
            capture_output=True,
            text=True,
            timeout=540,
            env=os.environ.copy(),
        )  # fmt: skip
    finally:
        server.kill()
        server.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    logs = report["logs"]
    assert report["code"] == 0, logs
    assert "probed" in logs, logs
    # Nothing on A's loopback heard from the guest, over TCP or UDP.
    assert report["reached"] == [], report["reached"]
    assert "tcp-open" not in logs, logs
    # The guest still reaches other machines, by address and by name.
    assert f"by-ip {REPLY}" in logs, logs
    assert f"by-name {REPLY}" in logs, logs


@pytest.fixture(scope="session")
def busybox_image(guest_bundle: object) -> str:
    from testimages import install_busybox_image

    install_busybox_image()
    return IMAGE
