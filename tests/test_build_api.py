"""``POST /build`` on a real store without a VM: FROM an image, COPY from the context,
config instructions, the cache, errors as the classic builder's stream reports them.
(RUN steps need VMs: tests/test_build_vm.py.)"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from husk.oci.archive import import_rootfs
from husk.oci.store import ImageStore

DOCKERFILE = """\
FROM husk.local/base:1
ARG VERSION=1
COPY --chown=7:8 app/ /srv/app/
COPY top.txt /etc/top-${VERSION}.txt
ENV MODE=test VERSION=${VERSION}
WORKDIR /srv/app
ENTRYPOINT ["/bin/tool"]
EXPOSE 80/udp 81
LABEL a=b
HEALTHCHECK --interval=5s --retries=2 CMD ["check"]
STOPSIGNAL SIGINT
"""


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _messages(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.splitlines() if line.strip()]


@pytest.fixture
def api_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    base = io.BytesIO(_tar({"etc/base.txt": b"base\n", "bin/tool": b"#!/bin/sh\n"}))
    import_rootfs(base, "husk.local/base:1", store=ImageStore(), changes=['CMD ["sh"]'])
    return tmp_path


def test_build_through_the_api(api_env: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from husk.daemon.docker import build_app
    from husk.runtime.runtime import Runtime

    context = _tar(
        {
            "Dockerfile": DOCKERFILE.encode(),
            "app/main.py": b"print('hi')\n",
            "app/cache.tmp": b"junk",
            "top.txt": b"top\n",
            ".dockerignore": b"**/*.tmp\n",
        }
    )

    async def body() -> None:
        async with TestClient(TestServer(build_app(Runtime()))) as client:
            query = "t=husk.local/app:1&buildargs=" + json.dumps({"VERSION": "2", "NOPE": "x"})
            answer = await client.post(f"/v1.41/build?{query}", data=context)
            assert answer.status == 200
            messages = _messages(await answer.read())
            text = "".join(m.get("stream", "") for m in messages)
            assert "Step 3/11 : COPY --chown=7:8 app/ /srv/app/" in text
            assert "Successfully tagged husk.local/app:1" in text
            assert "[Warning] One or more build-args ['NOPE'] were not consumed" in text
            ids = [m["aux"]["ID"] for m in messages if "aux" in m]
            assert len(ids) == 1

            inspect = await (await client.get("/images/husk.local/app:1/json")).json()
            assert inspect["Id"] == ids[0]
            config = inspect["Config"]
            assert config["Entrypoint"] == ["/bin/tool"] and not config.get("Cmd")
            assert config["WorkingDir"] == "/srv/app" and config["StopSignal"] == "SIGINT"
            assert "MODE=test" in config["Env"] and "VERSION=2" in config["Env"]
            assert set(config["ExposedPorts"]) == {"80/udp", "81/tcp"}
            assert config["Healthcheck"]["Test"] == ["CMD", "check"]
            assert config["Healthcheck"]["Interval"] == 5_000_000_000
            assert config["Labels"] == {"a": "b"}

            store = ImageStore()
            image = store.resolve("husk.local/app:1")
            assert len(image.layers) == 3  # the base's and two COPYs
            app_layer = store.blob_path(image.layers[1].digest)
            with tarfile.open(app_layer) as tar:
                members = {m.name: m for m in tar.getmembers()}
            assert set(members) == {"srv/app/main.py"}  # .dockerignore'd file left out
            assert (members["srv/app/main.py"].uid, members["srv/app/main.py"].gid) == (7, 8)
            with tarfile.open(store.blob_path(image.layers[2].digest)) as tar:
                assert tar.getnames() == ["etc/top-2.txt"]

            history = await (await client.get("/images/husk.local/app:1/history")).json()
            assert history[0]["Id"] == ids[0]
            assert history[0]["CreatedBy"] == "/bin/sh -c #(nop) STOPSIGNAL SIGINT"
            assert len(history) == 11  # the import, then one per instruction after FROM

            # Unchanged: every step from the cache, the very same image.
            again = _messages(await (await client.post(f"/build?{query}", data=context)).read())
            again_text = "".join(m.get("stream", "") for m in again)
            assert again_text.count("Using cache") == 2
            assert [m["aux"]["ID"] for m in again if "aux" in m] == ids
            # Another build arg: the second COPY's destination changes, so from there on.
            other = "t=husk.local/app:2&buildargs=" + json.dumps({"VERSION": "3"})
            third = _messages(await (await client.post(f"/build?{other}", data=context)).read())
            assert "".join(m.get("stream", "") for m in third).count("Using cache") == 1
            # --no-cache: nothing reused.
            fresh = _messages(
                await (await client.post(f"/build?{query}&nocache=1", data=context)).read()
            )
            assert "Using cache" not in "".join(m.get("stream", "") for m in fresh)

            # The intermediate images are hidden unless all=1.
            listed = await (await client.get("/images/json")).json()
            everything = await (await client.get("/images/json?all=1")).json()
            assert len(everything) > len(listed)
            untagged = [item for item in listed if not item["RepoTags"]]
            assert len(untagged) < len([item for item in everything if not item["RepoTags"]])

            # -q: only the id.
            quiet = _messages(await (await client.post(f"/build?{query}&q=1", data=context)).read())
            # (the --no-cache build's steps are the cache now, as in Docker)
            fresh_id = next(m["aux"]["ID"] for m in fresh if "aux" in m)
            assert fresh_id != ids[0]
            assert [m["stream"] for m in quiet if "stream" in m] == [fresh_id + "\n"]

            # Errors: a source outside the context, an unknown instruction, no Dockerfile.
            for dockerfile, expected in (
                ("FROM husk.local/base:1\nCOPY ../etc/passwd /x\n", "outside the build context"),
                ("FROM husk.local/base:1\nFORM x\n", "unknown instruction: FORM"),
                ("FROM husk.local/base:1\nADD https://example.com/x /x\n", "not supported"),
            ):
                bad = _tar({"Dockerfile": dockerfile.encode()})
                reply = await client.post("/build?t=husk.local/bad:1", data=bad)
                text = (await reply.read()).decode()
                assert expected in text, text
            other_platform = await client.post("/build?platform=linux/s390x", data=context)
            assert other_platform.status == 501
            assert "linux/s390x" in (await other_platform.json())["message"]
            buildkit = await client.post("/build?version=2", data=context)
            assert buildkit.status == 501
            missing = await client.post("/build?dockerfile=Nope", data=context)
            assert missing.status == 400
            assert "Cannot locate specified Dockerfile: Nope" in (await missing.json())["message"]
            assert (await client.get("/images/husk.local/bad:1/json")).status == 404
            pruned = await (await client.post("/build/prune")).json()
            assert pruned["CachesDeleted"] == []

    asyncio.run(body())
