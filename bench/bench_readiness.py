"""Image readiness (issue 16, item 3): from pulling an image that is not in the store yet
to the first container of it having run, against skopeo + umoci + podman on this machine.

The image is realistic and built here from Debian packages' files: five gzip layers
(busybox, CPython's standard library, Perl's modules twice over, the i18n data), about
120 MB unpacked. It is pushed once to a local registry (docker-registry on 127.0.0.1).

- **husk**: one isolated installation (this checkout's sources, its own data and run
  directories, the daemon started on demand). Before each sample the image is removed
  (``husk rmi``) and its cached erofs disk deleted, so the sample pays everything a new
  image costs. Timed: ``husk pull REF`` then ``husk run --rm REF true``, each a fresh CLI.
  The pull builds the image's erofs disk while it downloads (each layer applied as soon
  as it arrives), so the run finds it. One untimed run first builds the boot template
  of this shape (a cost paid once per installation and VM shape, not per image:
  bench_cli.py measures it).
- **peer**: ``skopeo copy docker://REF oci:DIR`` + ``umoci unpack`` + ``podman run --rm
  --network none --rootfs BUNDLE/rootfs true`` (podman 4.3 with runc, state in a
  temporary directory): download, unpack, first run.
- **podman alone** (for reference): ``podman pull`` + ``podman run --rm --network none``
  into an emptied storage.

Samples alternate husk and peers run by run. With ``HUSK_BENCH_BASELINE=REV`` in the
environment, a second husk installation runs REV's sources in the same alternation.

    python3 bench/bench_readiness.py [--runs 5] [--quick] [--json]
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
from bench_networks import Husk, StepFailed, run
from bench_pull import tree_entries
from benchlib import Figure, PartOptions, Target, progress

SECTION = "image readiness (issue 16)"
BASELINE_ENV = "HUSK_BENCH_BASELINE"
REPOSITORY = "bench/readiness"
# Trees of Debian packages on this host: realistic, compressible, many small files.
LAYER_SOURCES = (
    Path("/usr/lib/python3.11"),
    Path("/usr/share/perl"),
    Path("/usr/lib/x86_64-linux-gnu/perl"),
    Path("/usr/share/i18n"),
)
SKOPEO_POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}'


def build_layout(dest: Path) -> tuple[Path, int]:
    """The image as an OCI layout, and its unpacked size in bytes."""
    from testimages import ImageSpec, Layer, LayoutWriter, busybox_entries

    layers = [Layer(busybox_entries(), "gzip")]
    layers += [
        Layer(tree_entries(source, str(source).lstrip("/"), max_files=None), "gzip")
        for source in LAYER_SOURCES
        if source.is_dir()
    ]
    size = sum(len(getattr(e, "data", b"")) for layer in layers for e in layer.entries)
    writer = LayoutWriter(dest)
    writer.tag(writer.image(ImageSpec(layers=layers)), "latest")
    return dest, size


class Podman:
    """podman with runc and its storage under ``work`` (nothing of the host's)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.base, self.env = benchlib.private_podman(work, benchlib.husk_env(work))

    def __call__(self, *args: str) -> str:
        return run([*self.base, *args], self.env, 600)

    def reset(self) -> None:
        with contextlib.suppress(StepFailed, subprocess.SubprocessError):
            self("system", "reset", "-f")


def timed(step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def forget_image(husk: Husk, reference: str) -> None:
    """The image and its erofs disk gone, so the next pull starts from nothing."""
    with contextlib.suppress(StepFailed):
        husk("rmi", "-f", reference)
    for disk in (husk.root / "data" / "rootfs").glob("*.erofs"):
        disk.unlink()


@contextlib.contextmanager
def registry_with_image(work: Path) -> Iterator[tuple[str, int, int]]:
    from registry_fixtures import start_registry

    registry = start_registry("plain")
    try:
        layout, size = build_layout(work / "layout")
        reference = registry.push_oci_layout(layout, f"{REPOSITORY}:latest")
        layers = len(registry.inspect(reference)["Layers"])
        yield reference, size, layers
    finally:
        registry.stop()


@dataclass
class Samples:
    husk_total: list[float] = field(default_factory=list)
    husk_pull: list[float] = field(default_factory=list)
    husk_first_run: list[float] = field(default_factory=list)
    peer_total: list[float] = field(default_factory=list)
    peer_steps: dict[str, list[float]] = field(
        default_factory=lambda: {"skopeo copy": [], "umoci unpack": [], "podman run": []}
    )
    podman_total: list[float] = field(default_factory=list)
    baseline: Samples | None = None


def sample_husk(husk: Husk, reference: str, samples: Samples) -> None:
    forget_image(husk, reference)
    pulled = timed(lambda: husk("pull", reference, timeout=600))
    ran = timed(lambda: husk("run", "--rm", reference, "true"))
    samples.husk_pull.append(pulled)
    samples.husk_first_run.append(ran)
    samples.husk_total.append(pulled + ran)


def sample_peer(podman: Podman, reference: str, policy: Path, peer: Path, samples: Samples) -> None:
    shutil.rmtree(peer, ignore_errors=True)
    peer.mkdir()
    steps = {
        "skopeo copy": [
            "skopeo",
            "--policy",
            str(policy),
            "copy",
            "--src-tls-verify=false",
            f"docker://{reference}",
            f"oci:{peer}/image:latest",
        ],
        "umoci unpack": ["umoci", "unpack", "--image", f"{peer}/image:latest", f"{peer}/bundle"],
        "podman run": [
            *podman.base,
            "run",
            "--rm",
            "--network",
            "none",
            "--rootfs",
            f"{peer}/bundle/rootfs",
            "true",
        ],
    }
    total = 0.0
    for step, argv in steps.items():
        took = timed(functools.partial(run, argv, podman.env, 600))
        samples.peer_steps[step].append(took)
        total += took
    samples.peer_total.append(total)
    shutil.rmtree(peer, ignore_errors=True)


def sample_podman(podman: Podman, reference: str, samples: Samples) -> None:
    podman.reset()
    pulled = timed(lambda: podman("pull", "--tls-verify=false", reference))
    ran = timed(lambda: podman("run", "--rm", "--network", "none", reference, "true"))
    samples.podman_total.append(pulled + ran)


@contextlib.contextmanager
def baseline_husk(scratch: Path) -> Iterator[tuple[str, Husk] | None]:
    """A husk installation of ``HUSK_BENCH_BASELINE``'s sources, when it is set."""
    revision = os.environ.get(BASELINE_ENV)
    if not revision:
        yield None
        return
    from bench_hardening import baseline_checkout

    with baseline_checkout(revision, scratch) as source:
        husk = Husk.create("baseline", scratch / "husk-baseline")
        husk.env["PYTHONPATH"] = str(source / "src")
        try:
            yield revision, husk
        finally:
            husk.stop()


def measure(options: PartOptions) -> list[Figure]:
    benchlib.import_tests_helpers()
    runs = 2 if options.quick else options.runs
    samples = Samples()
    with benchlib.scratch_root("hb-ready-") as scratch:
        progress("readiness: building and pushing the image")
        with (
            registry_with_image(scratch) as (reference, size, layers),
            baseline_husk(scratch) as baseline,
        ):
            husk = Husk.create("husk", scratch / "husk")
            podman = Podman(scratch / "podman")
            policy = scratch / "policy.json"
            policy.write_text(SKOPEO_POLICY)
            installations = [(husk, samples)]
            if baseline is not None:
                samples.baseline = Samples()
                installations.append((baseline[1], samples.baseline))
            try:
                progress("readiness: warming this shape's boot template (untimed)")
                for installation, _ in installations:
                    installation("pull", reference, timeout=600)
                    installation("run", "--rm", reference, "true", timeout=600)
                for sample in range(runs):
                    progress(f"readiness: run {sample + 1}/{runs}")
                    order: list[Callable[[], None]] = [
                        functools.partial(sample_husk, installation, reference, into)
                        for installation, into in installations
                    ]
                    order += [
                        lambda: sample_peer(podman, reference, policy, scratch / "peer", samples),
                        lambda: sample_podman(podman, reference, samples),
                    ]
                    for step in order if sample % 2 == 0 else reversed(order):
                        step()
            finally:
                husk.stop()
                podman.reset()
    return figures(samples, size, layers, baseline[0] if baseline is not None else None)


def figures(samples: Samples, size: int, layers: int, baseline: str | None = None) -> list[Figure]:
    image = f"{layers} gzip layers, {size / 1e6:.0f} MB unpacked, local registry"
    out = [
        Figure(
            SECTION,
            f"husk pull + first run ({image})",
            "s",
            samples.husk_total,
            "husk pull REF; husk run --rm REF true",
        ),
        Figure(SECTION, "  of which husk pull", "s", samples.husk_pull, "husk pull REF"),
        Figure(
            SECTION,
            "  of which the first run (its disk built by the pull, VM from template)",
            "s",
            samples.husk_first_run,
            "husk run --rm REF true",
        ),
        Figure(
            SECTION,
            "skopeo copy + umoci unpack + podman run --rootfs",
            "s",
            samples.peer_total,
            "skopeo copy docker://REF oci:DIR; umoci unpack; podman run --rm --network none "
            "--rootfs DIR/bundle/rootfs true",
            peer=True,
        ),
    ]
    for step, taken in samples.peer_steps.items():
        out.append(Figure(SECTION, f"  of which {step}", "s", taken, step, peer=True))
    out.append(
        Figure(
            SECTION,
            "podman pull + podman run (its own storage)",
            "s",
            samples.podman_total,
            "podman pull REF; podman run --rm --network none REF true",
            peer=True,
        )
    )
    if samples.husk_total and samples.peer_total:
        ratio = statistics.median(samples.husk_total) / statistics.median(samples.peer_total)
        out.append(
            Figure(
                SECTION,
                "husk / (skopeo + umoci + podman run), medians",
                "x",
                [],
                target=Target("<=", 1.0, "issue 16"),
                derived=True,
                summary=(round(ratio, 3), None, None),
            )
        )
        # Each husk sample beside the peer's of the same round: robust to load that
        # changes between rounds on a shared host.
        pairs = [h / p for h, p in zip(samples.husk_total, samples.peer_total, strict=False)]
        out.append(Figure(SECTION, "husk / peer, run by run", "x", [round(r, 3) for r in pairs]))
    if samples.baseline is not None and samples.baseline.husk_total:
        base = samples.baseline
        out += [
            Figure(SECTION, f"baseline {baseline}: husk pull + first run", "s", base.husk_total),
            Figure(SECTION, f"  baseline {baseline}: of which husk pull", "s", base.husk_pull),
            Figure(SECTION, f"  baseline {baseline}: the first run", "s", base.husk_first_run),
        ]
        pairs = [h / b for h, b in zip(samples.husk_total, base.husk_total, strict=False)]
        out.append(
            Figure(SECTION, "husk / baseline, run by run", "x", [round(r, 3) for r in pairs])
        )
    return out


if __name__ == "__main__":
    benchlib.part_main("readiness", __doc__ or "", measure, default_runs=5)
