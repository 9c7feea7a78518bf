"""``_ping``, ``version``, ``info``, ``events`` and ``system/df``."""

from __future__ import annotations

import json
import os
import platform
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

import husk
from husk import settings, timestamps
from husk.daemon.docker import shapes, volumes
from husk.daemon.docker.context import context
from husk.daemon.docker.errors import STARTED_RESPONSE, json_reply
from husk.daemon.docker.events import event_json
from husk.daemon.docker.params import filters_of, query_time
from husk.daemon.docker.routing import (
    API_VERSION,
    MIN_API_VERSION,
    add_route,
    api_version,
    husk_version,
    offered_version,
)
from husk.daemon.docker.sizes import container_sizes
from husk.daemon.docker.streams import json_lines_response
from husk.paths import data_dir

GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}
EVENT_FILTERS = {"type", "event", "container", "image", "label", "scope"}
NETWORK_DRIVER = "qemu-user"


def host_arch() -> str:
    machine = platform.machine()
    return GO_ARCH.get(machine, machine)


def operating_system() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "PRETTY_NAME":
                return value.strip().strip('"')
    except OSError:
        pass
    return platform.system()


def memory_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


async def ping(request: web.Request) -> web.StreamResponse:
    headers = {
        "Api-Version": API_VERSION,
        "Builder-Version": "",
        "Docker-Experimental": "false",
        "Ostype": "linux",
        "Swarm": "inactive",
        "Cache-Control": "no-cache, no-store, must-revalidate",
        "Pragma": "no-cache",
    }
    body = b"" if request.method == "HEAD" else b"OK"
    return web.Response(
        body=body, headers=headers, content_type="text/plain", charset="utf-8", status=200
    )


def _build_time() -> str:
    try:
        when = os.path.getmtime(husk.__file__)
    except OSError:
        return ""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.000000000+00:00")


async def get_version(request: web.Request) -> web.StreamResponse:
    runtime_info = context(request).runtime.info()
    kernel = platform.release()
    offered = offered_version(request)
    engine = {
        "Name": "Engine",
        "Version": husk_version(),
        "Details": {
            "ApiVersion": offered,
            "Arch": host_arch(),
            "BuildTime": _build_time(),
            "Experimental": "false",
            "GitCommit": "",
            "GoVersion": f"python{platform.python_version()}",
            "KernelVersion": kernel,
            "MinAPIVersion": MIN_API_VERSION,
            "Os": "linux",
        },
    }
    components = [engine]
    qemu_version = str(runtime_info.get("qemu_version") or "")
    if qemu_version:
        components.append({"Name": "qemu", "Version": qemu_version, "Details": {}})
    bundle = str(runtime_info.get("bundle_digest") or "")
    if bundle:
        components.append({"Name": "guest-bundle", "Version": bundle, "Details": {}})
    return json_reply(
        {
            "Platform": {"Name": f"husk {husk_version()}"},
            "Components": components,
            "Version": husk_version(),
            "ApiVersion": offered,
            "MinAPIVersion": MIN_API_VERSION,
            "GitCommit": "",
            "GoVersion": f"python{platform.python_version()}",
            "Os": "linux",
            "Arch": host_arch(),
            "KernelVersion": kernel,
            "BuildTime": _build_time(),
        }
    )


async def get_info(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    runtime = ctx.runtime
    records = runtime.list(all=True)
    states = [r.state.status.value for r in records]
    details = runtime.info()
    accel = str(details.get("accel") or details.get("accelerator") or "")
    driver_status = [["Image disks", "erofs (read-only, one per image)"]]
    driver_status.append(["Writable layer", "ext4 disk per container, overlayfs in the guest"])
    if accel:
        driver_status.append(["Accelerator", accel])
    info: dict[str, Any] = {
        "ID": ctx.engine_id,
        "Containers": len(records),
        "ContainersRunning": states.count("running") + states.count("restarting"),
        "ContainersPaused": states.count("paused"),
        "ContainersStopped": len(
            [s for s in states if s not in ("running", "restarting", "paused")]
        ),
        "Images": len(runtime.images.list_images()),
        "Driver": "husk",
        "DriverStatus": driver_status,
        "Plugins": {
            "Volume": ["local"],
            "Network": [NETWORK_DRIVER],
            "Authorization": None,
            "Log": ["json-file"],
        },
        "MemoryLimit": True,
        "SwapLimit": False,
        "CpuCfsPeriod": False,
        "CpuCfsQuota": False,
        "CPUShares": False,
        "CPUSet": False,
        "PidsLimit": False,
        "IPv4Forwarding": True,
        "BridgeNfIptables": False,
        "BridgeNfIp6tables": False,
        "Debug": bool(ctx.debug),
        "NFd": len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0,
        "OomKillDisable": False,
        "NGoroutines": len(ctx.background),
        "SystemTime": timestamps.now(digits=6),
        "LoggingDriver": "json-file",
        "CgroupDriver": "none",
        "CgroupVersion": "",
        "NEventsListener": 0,
        "KernelVersion": platform.release(),
        "OperatingSystem": operating_system(),
        "OSVersion": "",
        "OSType": "linux",
        "Architecture": platform.machine(),
        "IndexServerAddress": "https://index.docker.io/v1/",
        "RegistryConfig": {
            "AllowNondistributableArtifactsCIDRs": None,
            "AllowNondistributableArtifactsHostnames": None,
            "InsecureRegistryCIDRs": ["127.0.0.0/8"],
            "IndexConfigs": {},
            "Mirrors": None,
        },
        "NCPU": os.cpu_count() or 1,
        "MemTotal": memory_total(),
        "GenericResources": None,
        "DockerRootDir": str(data_dir()),
        "HttpProxy": settings.proxy("HTTP_PROXY"),
        "HttpsProxy": settings.proxy("HTTPS_PROXY"),
        "NoProxy": settings.proxy("NO_PROXY"),
        "Name": socket.gethostname(),
        "Labels": [],
        "ExperimentalBuild": False,
        "ServerVersion": husk_version(),
        "Runtimes": {"husk": {"path": "qemu-system-x86_64"}},
        "DefaultRuntime": "husk",
        "Swarm": {
            "NodeID": "",
            "NodeAddr": "",
            "LocalNodeState": "inactive",
            "ControlAvailable": False,
            "Error": "",
            "RemoteManagers": None,
        },
        "LiveRestoreEnabled": True,
        "Isolation": "",
        "InitBinary": "",
        "ContainerdCommit": {"ID": ""},
        "RuncCommit": {"ID": ""},
        "InitCommit": {"ID": ""},
        "SecurityOptions": ["name=vm"],
        "Warnings": None,
    }
    version = api_version(request)
    if version >= (1, 49):  # deprecated in 1.48, gone from 1.49 on
        registry = info["RegistryConfig"]
        del registry["AllowNondistributableArtifactsCIDRs"]
        del registry["AllowNondistributableArtifactsHostnames"]
    if version >= (1, 50):  # deprecated in 1.48, gone from 1.50 on
        del info["BridgeNfIptables"], info["BridgeNfIp6tables"]
    return json_reply(info)


async def get_events(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    filters = filters_of(request, EVENT_FILTERS)
    since = query_time(request, "since")
    until = query_time(request, "until")
    response = await json_lines_response(request)
    request[STARTED_RESPONSE] = response
    async for event in ctx.events.stream(since=since, until=until, filters=filters):
        await response.write(json.dumps(event_json(event)).encode() + b"\n")
    await response.write_eof()
    return response


async def system_df(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    runtime = ctx.runtime
    records = runtime.list(all=True)
    images = runtime.images.list_images()
    use_count: dict[str, int] = {}
    for record in records:
        use_count[record.image_id] = use_count.get(record.image_id, 0) + 1
    containers = []
    for record in records:
        summary = shapes.container_summary(record)
        summary["SizeRw"], summary["SizeRootFs"] = container_sizes(runtime, record)
        containers.append(summary)
    return json_reply(
        {
            "LayersSize": runtime.images.disk_usage(),
            "Images": [
                shapes.image_summary(
                    image, containers=use_count.get(image.id, 0), version=api_version(request)
                )
                for image in images
            ],
            "Containers": containers,
            "Volumes": await volumes.disk_usage(runtime.volumes),
            "BuildCache": [],
        }
    )


def register(app: web.Application) -> None:
    add_route(app, "GET", "/_ping", ping)
    add_route(app, "HEAD", "/_ping", ping)
    add_route(app, "GET", "/version", get_version)
    add_route(app, "GET", "/info", get_info)
    add_route(app, "GET", "/events", get_events)
    add_route(app, "GET", "/system/df", system_df)
