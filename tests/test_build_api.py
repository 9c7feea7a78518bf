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
            # One copied file changed: the first COPY is cached, the second (and what follows
            # it) made again.
            changed = _tar(
                {
                    "Dockerfile": DOCKERFILE.encode(),
                    "app/main.py": b"print('hi')\n",
                    "top.txt": b"top, changed\n",
                }
            )
            edited = _messages(await (await client.post(f"/build?{query}", data=changed)).read())
            edited_text = "".join(m.get("stream", "") for m in edited)
            assert edited_text.count("Using cache") == 1, edited_text
            assert edited_text.index("Using cache") < edited_text.index("Step 4/11")
            assert [m["aux"]["ID"] for m in edited if "aux" in m] != ids
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


def _layer_members(store: ImageStore, digest: str) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(store.blob_path(digest)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_workdir_makes_its_directory_and_onbuild_triggers_run(
    api_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WORKDIR of a missing directory commits it (root, 0755, as the classic builder
    does), of an existing one only config; a base's ONBUILD triggers run right after
    FROM and are not inherited; a trigger that is ONBUILD/FROM/MAINTAINER is refused."""
    from aiohttp.test_utils import TestClient, TestServer

    from husk.daemon.docker import build_app
    from husk.runtime import commit
    from husk.runtime.runtime import Runtime

    parent = _tar(
        {
            "Dockerfile": (
                b"FROM husk.local/base:1\n"
                b"USER 1000\n"
                b"WORKDIR /etc\n"
                b"WORKDIR srv/app\n"
                b"ONBUILD COPY trigger.txt ./from-trigger.txt\n"
                b"ONBUILD ENV TRIGGERED=yes\n"
            ),
        }
    )
    child = _tar(
        {
            "Dockerfile": b"FROM husk.local/parent:1\nCOPY child.txt /child.txt\n",
            "trigger.txt": b"trigger\n",
            "child.txt": b"child\n",
        }
    )

    async def build(client: TestClient[Any, Any], tag: str, context: bytes) -> str:
        answer = await client.post(f"/build?t={tag}", data=context)
        messages = _messages(await answer.read())
        text = "".join(m.get("stream", "") + m.get("error", "") for m in messages)
        assert any("aux" in m for m in messages), text
        return text

    async def body() -> None:
        async with TestClient(TestServer(build_app(Runtime()))) as client:
            await build(client, "husk.local/parent:1", parent)
            store = ImageStore()
            image = store.resolve("husk.local/parent:1")
            assert len(image.layers) == 2  # the base's, then WORKDIR's (/etc exists)
            made = _layer_members(store, image.layers[1].digest)
            assert set(made) == {"etc/srv", "etc/srv/app"}
            assert all(m.isdir() and m.mode == 0o755 for m in made.values())
            assert all((m.uid, m.gid) == (0, 0) for m in made.values())  # not USER's
            history = image.config["history"]
            workdirs = [h for h in history if "WORKDIR" in h["created_by"]]
            assert [bool(h.get("empty_layer")) for h in workdirs] == [True, False]
            assert image.config["config"]["OnBuild"] == [
                "COPY trigger.txt ./from-trigger.txt",
                "ENV TRIGGERED=yes",
            ]
            # Cached: the same image, no new layer, the layers not read again.
            from husk.build import workdir

            def unexpected(*_args: object) -> list[str]:
                raise AssertionError("a cached WORKDIR read the layers")

            with monkeypatch.context() as patched:
                patched.setattr(workdir, "missing_directories", unexpected)
                again = await build(client, "husk.local/parent:2", parent)
            assert "Using cache" in again
            assert store.resolve("husk.local/parent:2").id == image.id

            text = await build(client, "husk.local/child:1", child)
            assert "# Executing 2 build triggers" in text
            built = store.resolve("husk.local/child:1")
            assert len(built.layers) == 4  # base, WORKDIR, the trigger's COPY, the COPY
            assert set(_layer_members(store, built.layers[2].digest)) == {
                "etc/srv/app/from-trigger.txt"
            }
            config = built.config["config"]
            assert "TRIGGERED=yes" in config["Env"] and not config.get("OnBuild")

            for trigger, expected in (
                ("ONBUILD ONBUILD RUN x", "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"),
                ("ONBUILD FROM x", "FROM isn't allowed as an ONBUILD trigger"),
                ("ONBUILD MAINTAINER me", "MAINTAINER isn't allowed as an ONBUILD trigger"),
            ):
                bad = _tar({"Dockerfile": f"FROM husk.local/base:1\n{trigger}\n".encode()})
                reply = await client.post("/build?t=husk.local/bad:2", data=bad)
                assert expected in (await reply.read()).decode()
            # The same refused trigger in a base image's config (made by another tool).
            base = store.resolve("husk.local/base:1")
            commit.store_image(
                store,
                base,
                {**base.config["config"], "OnBuild": ["FROM other"]},
                layer=None,
                history=[],
                names=["husk.local/onbuild-from:1"],
            )
            bad = _tar({"Dockerfile": b"FROM husk.local/onbuild-from:1\nENV A=1\n"})
            reply = await client.post("/build?t=husk.local/bad:3", data=bad)
            assert "FROM isn't allowed as an ONBUILD trigger" in (await reply.read()).decode()
            assert (await client.get("/images/husk.local/bad:3/json")).status == 404

    asyncio.run(body())
