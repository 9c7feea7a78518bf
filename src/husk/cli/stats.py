"""``husk stats``: live resource usage of containers, in Docker's table."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import click

from husk import errors
from husk.cli.format import Formatter, binary_size, human_size
from husk.client.daemon import connect
from husk.client.http import ApiClient
from husk.client.session import container_path

DEFAULT_TABLE = (
    "{{.ID}}\t{{.Name}}\t{{.CPUPerc}}\t{{.MemUsage}}\t{{.MemPerc}}"
    "\t{{.NetIO}}\t{{.BlockIO}}\t{{.PIDs}}"
)
HEADERS = {
    "Container": "CONTAINER",
    "ID": "CONTAINER ID",
    "Name": "NAME",
    "CPUPerc": "CPU %",
    "MemUsage": "MEM USAGE / LIMIT",
    "MemPerc": "MEM %",
    "NetIO": "NET I/O",
    "BlockIO": "BLOCK I/O",
    "PIDs": "PIDS",
}
REFRESH_SECONDS = 1.0
ONE_SHOT_TIMEOUT = 60.0


def cpu_percent(stats: dict[str, Any]) -> float:
    """Docker's formula: the container's share of the host's CPU time since the last read."""
    cpu = stats.get("cpu_stats") or {}
    previous = stats.get("precpu_stats") or {}
    used = (cpu.get("cpu_usage") or {}).get("total_usage", 0) - (
        previous.get("cpu_usage") or {}
    ).get("total_usage", 0)
    system = cpu.get("system_cpu_usage", 0) - previous.get("system_cpu_usage", 0)
    online = cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or [])
    if used > 0 and system > 0:
        return float(used / system * (online or 1) * 100.0)
    return 0.0


def memory_used(stats: dict[str, Any]) -> int:
    """Usage without reclaimable page cache (what Docker shows)."""
    memory = stats.get("memory_stats") or {}
    usage = int(memory.get("usage") or 0)
    details = memory.get("stats") or {}
    for key in ("total_inactive_file", "inactive_file"):
        inactive = details.get(key)
        if inactive is not None and int(inactive) < usage:
            return usage - int(inactive)
    return usage


def io_totals(stats: dict[str, Any]) -> tuple[int, int, int, int]:
    """(net rx, net tx, block read, block write) in bytes."""
    networks = stats.get("networks") or {}
    rx = sum(int(n.get("rx_bytes") or 0) for n in networks.values())
    tx = sum(int(n.get("tx_bytes") or 0) for n in networks.values())
    read = write = 0
    for entry in (stats.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []:
        op = str(entry.get("op", "")).lower()
        if op == "read":
            read += int(entry.get("value") or 0)
        elif op == "write":
            write += int(entry.get("value") or 0)
    return rx, tx, read, write


class StatsRow:
    """One container's line, with the fields ``--format`` knows."""

    template_fields = tuple(HEADERS)

    def __init__(
        self,
        ref: str,
        stats: dict[str, Any] | None,
        *,
        truncate: bool = True,
        name: str = "",
    ) -> None:
        self._ref = ref
        self._name = name
        self._stats = stats or {}
        self._truncate = truncate
        self._empty = stats is None

    def _dash(self, text: str) -> str:
        return "--" if self._empty else text

    @property
    def Container(self) -> str:
        return self._ref

    @property
    def ID(self) -> str:
        full = str(self._stats.get("id") or self._ref)
        return full[:12] if self._truncate else full

    @property
    def Name(self) -> str:
        return str(self._stats.get("name") or self._name or "--").lstrip("/")

    @property
    def CPUPerc(self) -> str:
        return self._dash(f"{cpu_percent(self._stats):.2f}%")

    @property
    def MemUsage(self) -> str:
        limit = int((self._stats.get("memory_stats") or {}).get("limit") or 0)
        return self._dash(f"{binary_size(memory_used(self._stats))} / {binary_size(limit)}")

    @property
    def MemPerc(self) -> str:
        limit = int((self._stats.get("memory_stats") or {}).get("limit") or 0)
        percent = memory_used(self._stats) / limit * 100.0 if limit else 0.0
        return self._dash(f"{percent:.2f}%")

    @property
    def NetIO(self) -> str:
        rx, tx, _, _ = io_totals(self._stats)
        return self._dash(f"{human_size(rx)} / {human_size(tx)}")

    @property
    def BlockIO(self) -> str:
        _, _, read, write = io_totals(self._stats)
        return self._dash(f"{human_size(read)} / {human_size(write)}")

    @property
    def PIDs(self) -> str:
        return self._dash(str(int((self._stats.get("pids_stats") or {}).get("current") or 0)))

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in self.template_fields}


class Watcher(threading.Thread):
    """Keeps the latest stats of one container from a streamed ``/stats``."""

    def __init__(self, api: ApiClient, ref: str) -> None:
        super().__init__(name=f"husk-stats-{ref}", daemon=True)
        self.api = api
        self.ref = ref
        self.latest: dict[str, Any] | None = None
        self.error: errors.HuskError | None = None
        self.finished = False

    def run(self) -> None:
        try:
            with self.api.open(
                "GET", container_path(self.ref, "stats"), query={"stream": True}, timeout=None
            ) as response:
                for line in response.iter_lines():
                    self.latest = json.loads(line)
        except errors.HuskError as err:
            self.error = err
        except (OSError, ValueError) as err:
            self.error = errors.Internal(f"stats of {self.ref}: {err}")
        finally:
            self.finished = True


def _one_shot(api: ApiClient, ref: str) -> dict[str, Any]:
    result = api.get(container_path(ref, "stats"), {"stream": False}, timeout=ONE_SHOT_TIMEOUT)
    if not isinstance(result, dict):
        raise errors.Internal(f"the husk daemon sent no stats for {ref}")
    return result


def _listed(api: ApiClient, show_all: bool) -> dict[str, str]:
    """Container id → name of the containers ``ps`` (or ``ps -a``) would list."""
    return {
        str(item["Id"]): str((item.get("Names") or [""])[0]).lstrip("/")
        for item in api.get("/containers/json", {"all": show_all}) or []
    }


@click.command(name="stats")
@click.option("-a", "--all", "show_all", is_flag=True, help="Show all containers.")
@click.option("--no-stream", is_flag=True, help="Print the first result and exit.")
@click.option("--no-trunc", is_flag=True, help="Do not truncate output.")
@click.option("--format", "format_spec", default="", help="table, json or a Go template.")
@click.argument("containers", nargs=-1)
def stats(
    show_all: bool, no_stream: bool, no_trunc: bool, format_spec: str, containers: tuple[str, ...]
) -> None:
    """Display a live stream of container resource usage."""
    api = connect()
    formatter = Formatter(format_spec, DEFAULT_TABLE, HEADERS)
    if no_stream:
        refs = list(containers) or list(_listed(api, show_all))
        results: dict[str, dict[str, Any] | errors.HuskError] = {}

        def fetch(ref: str) -> None:
            try:
                results[ref] = _one_shot(api, ref)
            except errors.HuskError as err:
                results[ref] = err

        threads = [threading.Thread(target=fetch, args=(ref,), daemon=True) for ref in refs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(ONE_SHOT_TIMEOUT + 5)
        rows = []
        for ref in refs:
            result = results.get(ref)
            if isinstance(result, errors.HuskError):
                raise result
            rows.append(StatsRow(ref, result, truncate=not no_trunc))
        output = formatter.render(rows)
        if output:
            click.echo(output)
        return
    _stream(api, formatter, list(containers), show_all, not no_trunc)


def _stream(
    api: ApiClient, formatter: Formatter, named: list[str], show_all: bool, truncate: bool
) -> None:
    watchers: dict[str, Watcher] = {}
    try:
        while True:
            names = {} if named else _listed(api, show_all)
            refs = named or list(names)
            for ref in refs:
                if ref not in watchers:
                    watchers[ref] = Watcher(api, ref)
                    watchers[ref].start()
            for ref in list(watchers):
                watcher = watchers[ref]
                if named and watcher.finished and isinstance(watcher.error, errors.NotFound):
                    raise watcher.error
                if ref not in refs:
                    del watchers[ref]
            rows = [
                StatsRow(ref, watchers[ref].latest, truncate=truncate, name=names.get(ref, ""))
                for ref in refs
            ]
            # Clear the screen and redraw, as Docker does on a terminal.
            prefix = "\x1b[2J\x1b[H" if sys.stdout.isatty() else ""
            click.echo(prefix + formatter.render(rows))
            time.sleep(REFRESH_SECONDS)
    except KeyboardInterrupt:
        return
