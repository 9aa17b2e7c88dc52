"""Filling one store from several processes, and joining their shards into one manifest.

Contract: process ``rank`` of ``world_size`` takes prompts ``rank, rank + world_size, ...`` of
the collection and writes a complete store of its own in ``OUT/rank-RRRRR-of-WWWWW/``. The rank
comes from explicit ``rank=``/``world_size=`` arguments or from the ``RANK``/``WORLD_SIZE``
environment variables that ``torchrun``, ``accelerate launch`` and most launchers set.
``merge(OUT)`` then writes ``OUT/manifest.json`` listing every rank's shards; no data moves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from embedwalk.errors import EmbedwalkError
from embedwalk.store import manifest as mf

__all__ = ["merge", "resolve_rank", "rank_dir"]


def resolve_rank(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if rank is None:
            rank = int(os.environ.get("RANK", "0"))
    rank = 0 if rank is None else int(rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise EmbedwalkError(f"rank {rank} / world_size {world_size} is invalid: need 0 <= rank < world_size")
    return rank, int(world_size)


def rank_dir(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}"


def merge(store_dir: Union[str, Path]):
    """Join the rank stores under ``store_dir`` into one manifest; returns the merged store."""
    from embedwalk.store.reader import ActivationStore

    root = Path(store_dir)
    parts = sorted(p for p in root.glob("rank-*-of-*") if p.is_dir())
    if not parts:
        raise EmbedwalkError(f"no rank-*-of-* folders in {root}; merge joins the stores that ranks of a distributed run wrote")
    world = {int(p.name.split("-of-")[1]) for p in parts}
    if len(world) != 1:
        raise EmbedwalkError(f"{root} mixes runs with world sizes {sorted(world)}; remove the stale rank folders")
    world_size = world.pop()
    manifests = []
    for r in range(world_size):
        d = root / rank_dir(r, world_size)
        m = mf.read_manifest(d)
        if m is None or not m.get("complete"):
            state = "missing" if m is None else f"incomplete ({m['prompts']} prompts so far)"
            raise EmbedwalkError(f"rank {r} of {world_size} is {state} in {d}; rerun that rank (it resumes) before merging")
        manifests.append((d, m))
    first = manifests[0][1]
    for d, m in manifests[1:]:
        if m["config_hash"] != first["config_hash"]:
            raise EmbedwalkError(f"{d} was written with a different configuration from rank 0; these ranks cannot be merged")
    shards = [{**s, "file": f"{d.name}/{s['file']}"} for d, m in manifests for s in m["shards"]]
    merged = {
        **{k: v for k, v in first.items() if k not in ("shards", "rank")},
        "shards": shards, "rank": None, "ranks": [d.name for d, _ in manifests],
        "rows": sum(m["rows"] for _, m in manifests), "prompts": sum(m["prompts"] for _, m in manifests),
        "bytes": sum(m["bytes"] for _, m in manifests), "complete": True,
    }
    mf.write_json_atomic(root / mf.MANIFEST, merged)
    store = ActivationStore(root)
    store.write_metadata_table()
    return store
