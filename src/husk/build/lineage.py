"""Which images are intermediate: untagged parents of another image (a build's steps),
hidden from ``images`` unless ``--all``, as Docker hides them."""

from __future__ import annotations

from collections.abc import Iterable

from husk.oci.store import ImageRecord


def _chain(record: ImageRecord) -> tuple[tuple[str, ...], tuple[str, ...]]:
    history = record.config.get("history") or []
    steps = tuple(
        f"{h.get('created')}\0{h.get('created_by')}" for h in history if isinstance(h, dict)
    )
    return record.diff_ids, steps


def intermediate_ids(records: Iterable[ImageRecord]) -> set[str]:
    """Ids of the untagged images whose layers and history another image extends."""
    items = list(records)
    chains = {r.id: _chain(r) for r in items}
    result = set()
    for record in items:
        if record.names:
            continue
        layers, steps = chains[record.id]
        if not steps:
            continue
        for other in items:
            if other.id == record.id:
                continue
            other_layers, other_steps = chains[other.id]
            if (
                len(other_steps) > len(steps)
                and other_steps[: len(steps)] == steps
                and other_layers[: len(layers)] == layers
            ):
                result.add(record.id)
                break
    return result
