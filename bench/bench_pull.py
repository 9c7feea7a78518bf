"""Benchmark: pull + unpack of a multi-layer image from a local registry.

husk (``pull`` into a fresh store, then unpack to a directory) against
``skopeo copy docker://… oci:…`` + ``umoci unpack`` of the same image, run
alternately, each in its own process so both pay their start-up. Prints the
median of each side and the ratio husk / theirs (lower is better).

    python bench/bench_pull.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

# Debian-packaged trees that make realistic, compressible layers.
LAYER_SOURCES = [
    Path("/usr/lib/python3.11"),
    Path("/usr/share/zoneinfo"),
    Path("/usr/share/perl/5.36"),
]
MAX_LAYER_FILES = 6000


def tree_entries(root: Path, prefix: str, max_files: int | None = MAX_LAYER_FILES) -> list[Any]:
    """Every file, directory and symlink under ``root`` at ``prefix`` in a layer (the first
    ``max_files`` of them), after the directories leading to ``prefix``."""
    from testimages import Entry, directory, file, symlink

    entries: list[Entry] = []
    count = 0
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts or (max_files is not None and count >= max_files):
            continue
        relative = f"{prefix}/{path.relative_to(root)}"
        if path.is_symlink():
            entries.append(symlink(relative, str(path.readlink())))
        elif path.is_dir():
            entries.append(directory(relative))
        elif path.is_file():
            entries.append(file(relative, path.read_bytes(), path.stat().st_mode & 0o7777))
        count += 1
    parents: list[Entry] = []
    parts = prefix.split("/")
    for depth in range(1, len(parts) + 1):
        parents.append(directory("/".join(parts[:depth])))
    return parents + entries


def build_bench_layout(dest: Path) -> Path:
    from testimages import ImageSpec, Layer, LayoutWriter, busybox_entries

    layers = [Layer(busybox_entries(), "gzip")]
    for source in LAYER_SOURCES:
        if source.is_dir():
            layers.append(Layer(tree_entries(source, str(source).lstrip("/")), "gzip"))
    writer = LayoutWriter(dest)
    writer.tag(writer.image(ImageSpec(layers=layers)), "latest")
    return dest


def husk_once(reference: str, workdir: Path) -> None:
    """One husk pull + unpack in this process (invoked as a subprocess by the bench)."""
    from husk.oci.pull import pull
    from husk.oci.store import ImageStore

    store = ImageStore(workdir / "store")
    record = asyncio.run(pull(reference, store=store, policy="always"))
    dest = workdir / "rootfs"
    from husk.oci import unpack

    # unpack_image(record, store, dest) is the agreed API; until it exists, the same
    # work through unpack_layers.
    unpack_image = getattr(unpack, "unpack_image", None)
    if unpack_image is not None:
        unpack_image(record, store, dest)
    else:
        unpack.unpack_layers(
            [(store.blob_path(layer.digest), layer.media_type) for layer in record.layers],
            dest,
            diff_ids=record.diff_ids,
        )
    if not (dest / "bin" / "busybox").is_file():
        raise SystemExit("husk unpack produced no /bin/busybox")


def _timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--husk-once", nargs=2, metavar=("REF", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.husk_once:
        husk_once(args.husk_once[0], Path(args.husk_once[1]))
        return

    from registry_fixtures import run_skopeo, start_registry

    registry = start_registry("plain")
    work = Path(tempfile.mkdtemp(prefix="husk-bench-"))
    try:
        layout = build_bench_layout(work / "layout")
        reference = registry.push_oci_layout(layout, "bench/multilayer:latest")
        info = json.loads(run_skopeo("inspect", "--tls-verify=false", f"docker://{reference}"))
        policy = Path(tempfile.gettempdir()) / "husk-test-skopeo-policy.json"
        husk_times: list[float] = []
        peer_times: list[float] = []
        for run in range(args.runs):
            husk_dir = work / f"husk-{run}"
            husk_dir.mkdir()
            husk_times.append(
                _timed([sys.executable, __file__, "--husk-once", reference, str(husk_dir)])
            )
            peer_dir = work / f"peer-{run}"
            peer_dir.mkdir()
            started = time.perf_counter()
            subprocess.run(
                [
                    "skopeo",
                    "--policy",
                    str(policy),
                    "copy",
                    "--src-tls-verify=false",
                    f"docker://{reference}",
                    f"oci:{peer_dir}/image:latest",
                ],
                check=True,
                capture_output=True,
                timeout=600,
            )
            subprocess.run(
                ["umoci", "unpack", "--image", f"{peer_dir}/image:latest", f"{peer_dir}/bundle"],
                check=True,
                capture_output=True,
                timeout=600,
            )
            peer_times.append(time.perf_counter() - started)
            shutil.rmtree(husk_dir, ignore_errors=True)
            shutil.rmtree(peer_dir, ignore_errors=True)
        husk_median = statistics.median(husk_times)
        peer_median = statistics.median(peer_times)
        result = {
            "image_layers": len(info["Layers"]),
            "runs": args.runs,
            "husk_median_s": round(husk_median, 3),
            "skopeo_umoci_median_s": round(peer_median, 3),
            "ratio": round(husk_median / peer_median, 3),
            "husk_runs_s": [round(t, 3) for t in husk_times],
            "skopeo_umoci_runs_s": [round(t, 3) for t in peer_times],
        }
        if args.json:
            print(json.dumps(result))
        else:
            print(f"layers: {result['image_layers']}, runs: {args.runs}")
            print(f"husk pull+unpack   median {husk_median:.3f}s  {result['husk_runs_s']}")
            print(f"skopeo+umoci       median {peer_median:.3f}s  {result['skopeo_umoci_runs_s']}")
            print(f"ratio husk/theirs  {result['ratio']}")
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
