"""Docker-compatible views of stored images (``image inspect``, ``images`` rows)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from husk import timestamps
from husk.humanize import human_size as human_size  # re-exported: callers import it here
from husk.oci.reference import parse_reference
from husk.oci.store import ImageRecord


def image_inspect(record: ImageRecord) -> dict[str, Any]:
    """The shape of ``docker image inspect`` for one image."""
    config = record.config
    return {
        "Id": record.id,
        "RepoTags": [n for n in record.names if "@" not in n],
        "RepoDigests": list(record.repo_digests),
        "Parent": "",
        "Comment": _history_comment(config),
        "Created": record.created,
        "DockerVersion": str(config.get("docker_version") or ""),
        "Author": str(config.get("author") or ""),
        "Config": config.get("config") or {},
        "Architecture": record.architecture,
        "Variant": record.variant or None,
        "Os": record.os,
        "Size": record.size,
        "VirtualSize": record.size,
        "RootFS": {"Type": "layers", "Layers": list(record.diff_ids)},
        "Manifest": {
            "Digest": record.manifest_digest,
            "MediaType": record.manifest_media_type,
            "Index": record.index_digest,
            "Layers": [
                {"Digest": layer.digest, "MediaType": layer.media_type, "Size": layer.size}
                for layer in record.layers
            ],
        },
        "Metadata": {"LastTagTime": record.added},
    }


def _history_comment(config: dict[str, Any]) -> str:
    history = config.get("history") or []
    if history and isinstance(history[-1], dict):
        return str(history[-1].get("comment") or "")
    return ""


@dataclass(frozen=True)
class ImageRow:
    repository: str
    tag: str
    digest: str
    record: ImageRecord


def image_rows(records: list[ImageRecord]) -> list[ImageRow]:
    """One row per name (``<none>`` for untagged), as ``docker images`` lists them."""
    rows: list[ImageRow] = []
    for record in records:
        digests = {parse_reference(d).repository: d.split("@", 1)[1] for d in record.repo_digests}
        named = False
        for name in record.names:
            ref = parse_reference(name)
            tag = ref.tag if ref.digest is None and ref.tag else "<none>"
            if ref.digest is not None and any(
                parse_reference(n).repository == ref.repository and "@" not in n
                for n in record.names
            ):
                continue  # the tagged row of this repository already shows the digest
            rows.append(
                ImageRow(
                    ref.familiar_repository,
                    tag,
                    ref.digest or digests.get(ref.repository, "<none>"),
                    record,
                )
            )
            named = True
        if not named:
            rows.append(ImageRow("<none>", "<none>", "<none>", record))
    return rows


def human_age(timestamp: str, now: datetime | None = None) -> str:
    """``3 days ago`` from an RFC 3339 timestamp; ``N/A`` when there is none."""
    if not timestamp:
        return "N/A"
    try:
        when = timestamps.parse(timestamp)
    except ValueError:
        return "N/A"
    seconds = int((now or datetime.now(UTC)).timestamp() - when)
    if seconds < 1:
        return "Less than a second ago"
    for limit, unit, size in (
        (60, "second", 1),
        (3600, "minute", 60),
        (86400, "hour", 3600),
        (86400 * 14, "day", 86400),
        (86400 * 60, "week", 86400 * 7),
        (86400 * 365 * 2, "month", 86400 * 30),
    ):
        if seconds < limit:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return f"{seconds // (86400 * 365)} years ago"
