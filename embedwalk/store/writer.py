"""Write activations from forward passes into a sharded, resumable store.

``cache_activations`` runs the model over a collection once; a ``Reader`` gathers the chosen
hooks at the chosen positions inside the hooks (cast to the storage dtype on the model's
device, so only 16-bit rows cross to the CPU) and hands each batch to a background thread
that writes shards. The queue between them is bounded: a slow disk slows the forward passes
instead of filling memory, so peak memory depends on the shard size, not the collection.

Determinism is what makes resumption exact: prompts are processed in collection order (each
rank takes every ``world_size``-th prompt), batches are fixed groups of ``batch_size`` prompts,
and a shard closes only at a batch boundary once it holds ``shard_rows`` rows. A rerun skips
the prompts covered by complete shards and produces byte-identical shards for the rest.
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from embedwalk.adapter import ModelAdapter, adapt, eval_mode
from embedwalk.casting import cast_finite
from embedwalk.errors import EmbedwalkError
from embedwalk.inputs import batches as make_batches
from embedwalk.run import Context, Reader, attached, forward
from embedwalk.store import manifest as mf
from embedwalk.store.distributed import rank_dir, resolve_rank
from embedwalk.store.identity import Unidentifiable, function_identity
from embedwalk.store.sources import item_digest, iter_items

__all__ = ["cache_activations", "plan_hooks", "FINAL_NORMED"]

FINAL_NORMED = "final_normed"
_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
_CANON = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)$")
# When several hook names share one tensor, the stored name is the first kind in this list.
_PREFERENCE = ("hook_resid_post", "hook_resid_pre", "hook_resid_mid", "hook_attn_out", "hook_mlp_out", "hook_embed")
Positions = Union[str, Callable[[Tensor, Tensor], Tensor]]


def _spec_to_name(adapter: ModelAdapter, spec: str) -> str:
    if not isinstance(spec, str):
        raise EmbedwalkError(f"a hook must be a string such as 'resid_post.3', 'final' or a TL hook name; got {spec!r}")
    if spec in ("final", "final_resid"):
        return adapter.final_resid_hook
    if spec == FINAL_NORMED:
        return FINAL_NORMED
    if spec == "embed":
        return adapter.hook("resid_pre", 0)
    kind, _, layer = spec.rpartition(".")
    if kind in _KINDS and layer.lstrip("-").isdigit():
        return adapter.hook(kind, int(layer))
    if spec in adapter.model.hook_dict:
        return spec
    raise EmbedwalkError(
        f"unknown hook {spec!r}: use 'resid_post.<layer>' (or resid_pre/resid_mid/attn_out/mlp_out), "
        "'embed', 'final', 'final_normed', or a TransformerLens hook name such as 'blocks.3.hook_resid_post'"
    )


def _kind_layer(adapter: ModelAdapter, name: str) -> tuple[str, Optional[int]]:
    if name == FINAL_NORMED:
        return FINAL_NORMED, adapter.n_layers
    m = _CANON.match(name)
    if m:
        return m.group(2), int(m.group(1))
    m = re.match(r"blocks\.(\d+)\.", name)
    return name, (int(m.group(1)) if m else (0 if name in ("hook_embed", "hook_pos_embed") else None))


class _Probe(Reader):
    """Holds every probed hook's tensor for one tiny pass, so shared storage can be seen."""

    def __init__(self, names):
        self.names, self.values = list(names), {}

    def hook_points(self, adapter):
        return self.names

    def read(self, name, value, ctx):
        self.values[name] = value  # kept alive so no freed buffer is reused by another hook


def plan_hooks(model, hooks: Optional[Sequence[str]] = None, layers: Optional[Sequence[int]] = None) -> list[dict]:
    """Resolve hook specs to stored entries ``{name, kind, layer, aliases}``, one per distinct tensor.

    Default: ``resid_post`` after each of ``layers`` (all layers when None) plus ``final``.
    Aliases are found by running one token and comparing tensor storage (TL 4 bridges expose
    ``blocks.0.hook_in`` = ``hook_resid_pre``, ``resid_post(l)`` = ``resid_pre(l+1)``, ...).
    """
    adapter = adapt(model)
    if hooks is None:
        chosen = range(adapter.n_layers) if layers is None else [adapter.check_layer(int(l)) for l in layers]
        hooks = [f"resid_post.{l}" for l in chosen] + ["final"]
    elif layers is not None:
        raise EmbedwalkError("pass either hooks=[...] or layers=[...] (layers picks resid_post hooks), not both")
    if isinstance(hooks, str):
        hooks = [h.strip() for h in hooks.split(",") if h.strip()]
    if not hooks:
        raise EmbedwalkError("no hooks to store; pass hooks=['resid_post.5', 'final', ...]")
    requested = [(spec, _spec_to_name(adapter, spec)) for spec in hooks]
    real = list(dict.fromkeys(n for _, n in requested if n != FINAL_NORMED))
    probe = _Probe(real)
    with torch.no_grad(), attached(adapter, [probe], [], [None]), eval_mode(adapter.model):
        batch = next(make_batches(adapter, torch.full((1, 2), adapter.pad_token_id), progress=False))
        forward(adapter, batch.to(adapter.device))
    groups: dict = {}
    for name in real:
        v = probe.values.get(name)
        if not isinstance(v, Tensor) or v.ndim != 3 or v.shape[-1] != adapter.d_model:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise EmbedwalkError(
                f"hook {name} gives {shape}; the store keeps one d_model={adapter.d_model} vector per token, so choose "
                "residual-stream hooks (resid_pre/mid/post, attn_out, mlp_out)"
            )
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride())
        groups.setdefault(key, []).append(name)
    canon = {}
    for names in groups.values():
        best = min(names, key=lambda n: next((i for i, p in enumerate(_PREFERENCE) if n.endswith(p)), len(_PREFERENCE)))
        for n in names:
            canon[n] = best
    if any(n == FINAL_NORMED for _, n in requested):
        canon[FINAL_NORMED] = FINAL_NORMED
    entries: dict[str, dict] = {}
    for spec, name in requested:
        c = canon[name]
        kind, layer = _kind_layer(adapter, c)
        e = entries.setdefault(c, {"name": c, "kind": kind, "layer": layer, "aliases": []})
        for alias in (spec, name):
            if alias != c and alias not in e["aliases"]:
                e["aliases"].append(alias)
    return list(entries.values())


def _positions_id(positions: Positions, positions_id: Optional[str] = None) -> str:
    """The configuration's record of the row-selection rule: what a positions function computes
    (see :mod:`embedwalk.store.identity`), or the name the user gives it."""
    if positions in ("all", "last"):
        if positions_id is not None:
            raise EmbedwalkError("positions_id names a positions function; drop it for positions='all' or 'last'")
        return positions
    if not callable(positions):
        raise EmbedwalkError(f"positions must be 'all', 'last' or a function (tokens, mask) -> bool mask; got {positions!r}")
    if positions_id is not None:
        if not isinstance(positions_id, str) or not positions_id:
            raise EmbedwalkError(f"positions_id must be a non-empty string naming the positions rule, got {positions_id!r}")
        return f"named:{positions_id}"
    name = f"{getattr(positions, '__module__', '?')}.{getattr(positions, '__qualname__', type(positions).__qualname__)}"
    try:
        return f"mask:{name}#{function_identity(positions)[:32]}"
    except Unidentifiable as e:
        raise EmbedwalkError(
            f"cannot tell what the positions function {name} computes ({e}), so a resumed store could mix two "
            "row-selection rules. Use a plain function of (tokens, mask) whose closure and globals hold plain "
            "values, or name the rule yourself: cache_activations(..., positions_id='even-tokens-v1') "
            "(change the name whenever the rule changes)"
        ) from None


class _Gather(Reader):
    """Selects rows inside the hooks and hands each finished batch to the shard writer.

    Every stored value must be finite: a value the cast to the storage dtype would turn into
    ``inf`` (float16 ends at 65504), or one the model itself made ``inf``/NaN, is refused by
    :func:`~embedwalk.casting.cast_finite` inside the hook, naming hook, prompt, position and
    value, before that batch reaches the shard writer.
    """

    def __init__(self, entries: list[dict], positions: Positions, dtype: torch.dtype, sink: Callable, directory: Optional[Path] = None):
        self.positions, self.dtype, self.sink = positions, dtype, sink
        self.texts: list = []  # this batch's prompts (text or token ids), to name one in an error
        here = f" in {directory}" if directory is not None else ""
        self.fix = (
            "Store in float32 (cache_activations(..., dtype=torch.float32), `embedwalk cache --dtype float32`) or "
            "bfloat16 (dtype=torch.bfloat16: float32's range, 8 significant bits). The dtype is part of the store's "
            f"configuration: the finished shards{here} hold only earlier prompts and cannot be resumed in another "
            "dtype, so write to a new directory (or delete this one)"
        )
        self.source_fix = (
            "The model's own forward made it (storing in float32 would keep it): a float16 model overflows inside its "
            "own forward, so load it in float32 or bfloat16; otherwise check its weights and this prompt"
        )
        self.attach: dict[str, list[tuple[str, bool]]] = {}
        for e in entries:
            hook = e["name"]
            normed = hook == FINAL_NORMED
            self.attach.setdefault("__final__" if normed else hook, []).append((hook, normed))
        self.keys = [e["name"] for e in entries]
        self.ids: list[int] = []
        self.extra: dict = {}
        self._sel = None
        self.acts: dict[str, Tensor] = {}

    def hook_points(self, adapter):
        points = list(self.attach)
        if "__final__" in self.attach:
            self.attach.setdefault(adapter.final_resid_hook, []).extend(self.attach.pop("__final__"))
            points = list(self.attach)
        return points

    def select(self, ctx: Context) -> Tensor:
        if self._sel is None:
            mask = ctx.batch.mask
            if self.positions == "all":
                sel = mask
            elif self.positions == "last":
                sel = torch.zeros_like(mask)
                sel[torch.arange(mask.shape[0], device=mask.device), ctx.batch.last] = True
            else:
                sel = self.positions(ctx.batch.tokens.cpu(), mask.cpu())
                if not isinstance(sel, Tensor) or sel.dtype != torch.bool or sel.shape != mask.shape:
                    # Integer indices (or 0/1 ints) would be read as a mask and store the wrong rows.
                    got = f"{sel.dtype} {tuple(sel.shape)}" if isinstance(sel, Tensor) else type(sel).__name__
                    raise EmbedwalkError(
                        f"positions must return a bool mask [batch, pos] shaped like the tokens {tuple(mask.shape)}, "
                        f"got {got}; to select indices, build a mask: sel = torch.zeros_like(mask); sel[:, idx] = True"
                    )
                sel = sel.to(mask.device) & mask  # pad positions are never stored
            self._sel = sel
        return self._sel

    def read(self, name, value, ctx):
        sel = self.select(ctx)
        rows = value[sel]
        for key, normed in self.attach[name]:
            v = ctx.adapter.final_norm(rows) if normed else rows
            # Cast on the model's device: a 16-bit row is half the bytes to move and to queue.
            # Checked for every storage dtype: a store never holds inf/NaN, whatever made it.
            self.acts[key] = cast_finite(
                v, self.dtype, what=f"cannot store hook {key}", fix=self.fix, source_fix=self.source_fix,
                locate=lambda idx: self._locate(idx, sel, ctx), check=True,
            ).to("cpu")

    def _locate(self, idx: tuple, sel: Tensor, ctx: Context) -> str:
        """Words for stored row ``idx[0]``, dimension ``idx[1]`` of this batch."""
        row, dim = idx
        b, p = (int(i) for i in sel.nonzero()[row])
        mask = ctx.batch.mask
        position = int(mask[b, : p + 1].sum()) - 1  # counted from the first real token, as stored
        token = ctx.adapter.to_str_tokens([int(ctx.batch.tokens[b, p])])[0]
        prompt = self.ids[b] if b < len(self.ids) else b
        text = self.texts[b] if b < len(self.texts) else None
        shown = f" {text[:60]!r}{'...' if len(text) > 60 else ''}" if isinstance(text, str) else ""
        return f"prompt {prompt}{shown}, position {position} (token {token!r}), dimension {dim}"

    def end_batch(self, ctx):
        sel = self.select(ctx).cpu()
        missing = [k for k in self.keys if k not in self.acts]
        if missing:
            raise EmbedwalkError(f"hooks {missing} did not fire during the forward pass; this model never runs them")
        mask = ctx.batch.mask.cpu()
        position = (mask.cumsum(-1) - 1)[sel].to(torch.int32)  # counted from the first real token
        local = torch.arange(mask.shape[0])[:, None].expand_as(mask)[sel]
        chunk = {
            "tokens": ctx.batch.tokens.cpu()[sel].to(torch.int32),
            "prompt": torch.tensor(self.ids, dtype=torch.int64)[local],
            "position": position,
            **{f"act.{k}": self.acts[k] for k in self.keys},
        }
        self.sink(chunk, sel.sum(-1).tolist(), dict(self.extra))
        self.acts, self._sel = {}, None


class _ShardWriter(threading.Thread):
    """Background thread: buffers batches, writes a shard when full, updates the manifest."""

    def __init__(self, directory: Path, manifest: dict, shard_rows: int, queue_size: int):
        super().__init__(daemon=True, name="embedwalk-shard-writer")
        self.directory, self.manifest, self.shard_rows = directory, manifest, shard_rows
        self.q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: Optional[BaseException] = None
        self.bytes_written = sum(s["bytes"] for s in manifest["shards"])
        self._stop_now = False
        self._buf: list = []
        self._rows = 0

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise EmbedwalkError(f"the shard writer failed: {self.error!r}") from self.error
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def run(self):
        try:
            while True:
                item = self.q.get()
                if item is None or self._stop_now:
                    if item is None and self._buf and not self._stop_now:
                        self._flush()
                    return
                self._buf.append(item)
                self._rows += int(item[0]["prompt"].shape[0])
                if self._rows >= self.shard_rows:
                    self._flush()
        except BaseException as e:  # surfaced in the main thread at the next put/close
            self.error = e

    def _flush(self):
        chunks = [c for c, _, _ in self._buf]
        tensors = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        prompts, rows, meta, digests = [], [], [], []
        for chunk, n_rows, extra in self._buf:
            prompts += extra["ids"]
            rows += n_rows
            meta += extra["meta"]
            digests += extra["digests"]
        index = len(self.manifest["shards"])
        name = f"shard-{index:05d}.safetensors"
        info = {"prompts": prompts, "rows": rows, "meta": meta if any(m is not None for m in meta) else None}
        size, sha = mf.write_shard(self.directory / name, tensors, {"embedwalk": mf.dumps(info)})
        self.manifest["shards"].append({
            "file": name, "rows": int(tensors["prompt"].shape[0]), "prompts": len(prompts),
            "first_prompt": prompts[0], "last_prompt": prompts[-1], "bytes": size, "sha256": sha,
            "data_sha256": hashlib.sha256(b"".join(digests)).hexdigest(),
        })
        self.manifest["rows"] += int(tensors["prompt"].shape[0])
        self.manifest["prompts"] += len(prompts)
        self.manifest["bytes"] += size
        mf.write_json_atomic(self.directory / mf.MANIFEST, self.manifest)
        self.bytes_written += size
        self._buf, self._rows = [], 0

    def close(self, *, flush: bool) -> None:
        if not flush:
            self._stop_now = True
        if self.is_alive():
            while True:
                try:
                    self.q.put(None, timeout=0.2)
                    break
                except queue.Full:
                    if not self.is_alive():
                        break
                    if not flush:  # drop queued batches: an aborted run keeps only complete shards
                        try:
                            self.q.get_nowait()
                        except queue.Empty:
                            pass
            self.join()
        if flush and self.error is not None:
            raise EmbedwalkError(f"the shard writer failed: {self.error!r}") from self.error


def _diff(old: dict, new: dict, prefix="") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: stored {a!r:.80} vs now {b!r:.80}")
    return out


def _prepare(directory: Path, manifest: dict) -> dict:
    """Start a new store or check that the one there was written with this very configuration."""
    old = mf.read_manifest(directory)
    if old is None:
        if directory.exists() and any(p.suffix == ".safetensors" or p.name.startswith("rank-") for p in directory.iterdir()):
            raise EmbedwalkError(f"{directory} holds shards but no manifest; it is not a store embedwalk can resume. Choose an empty directory")
        if directory.exists() and not directory.is_dir():
            raise EmbedwalkError(f"{directory} is a file, not a folder; pass a new or empty folder for the store")
        others = sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) if directory.exists() else []
        if others:
            # Never write a store next to a user's own files: a later cleanup of the store would take them too.
            raise EmbedwalkError(
                f"{directory} is not empty ({len(others)} entries, e.g. {others[:3]}) and is not an embedwalk "
                f"store (no {mf.MANIFEST}); pass a new or empty folder, e.g. {directory / 'acts'}"
            )
        directory.mkdir(parents=True, exist_ok=True)
        mf.write_json_atomic(directory / mf.MANIFEST, manifest)
        return manifest
    if old.get("config_hash") != manifest["config_hash"]:
        old_cfg, new_cfg = old.get("config", {}), manifest["config"]
        if not mf.identity_verified(old_cfg.get("model")):
            raise EmbedwalkError(
                f"{directory} was written before embedwalk fingerprinted the whole model (its manifest records "
                "the unembedding only), so embedwalk cannot tell whether this model is the one its rows came from, "
                "and resuming could mix rows of two models. Use a new --out directory; the store itself can still "
                "be read with open_store"
            )
        # The per-tensor digests would fill the listing; the model line says what differs.
        strip = lambda c: {**c, "model": {k: v for k, v in (c.get("model") or {}).items() if k != "fingerprint"}}  # noqa: E731
        diffs = _diff(strip(old_cfg), strip(new_cfg))
        why = mf.model_mismatch(old_cfg.get("model"), new_cfg.get("model"))
        if why:
            raise EmbedwalkError(
                f"{directory} was written by another model than the one given now: {why}. Its rows and this "
                "model's would mix in one store. Use a new --out directory for this model, or pass the model "
                "the store was written with" + ("; the configuration differs too:\n  " + "\n  ".join(diffs[:8]) if diffs else "")
            )
        raise EmbedwalkError(
            f"{directory} was written with a different configuration, so it cannot be resumed or mixed into:\n  "
            + "\n  ".join(diffs[:8] or ["(configuration hash differs)"])
            + "\nUse a new --out directory, or rerun with exactly the original settings."
        )
    _check_kept_shards(directory, old)
    for stray in directory.glob(".*.partial"):
        stray.unlink()  # a shard the last run was killed while writing
    return old


def _check_kept_shards(directory: Path, manifest: dict) -> None:
    """Resume keeps only shards whose bytes match the SHA-256 the manifest recorded for them.

    A damaged shard is an error (never silently rewritten: a disk that flips bits should be
    noticed). Shards deleted from the end are forgotten and rewritten by this run, which is
    how a damaged store is repaired: delete the damaged shard and every later one, rerun.
    """
    shards = manifest["shards"]
    present = [(directory / s["file"]).exists() for s in shards]
    cut = present.index(False) if False in present else len(shards)
    if any(present[cut:]):
        later = [s["file"] for s, p in zip(shards[cut:], present[cut:]) if p]
        raise EmbedwalkError(
            f"shard {directory / shards[cut]['file']} is missing but later shards {later[:3]} exist; a store is rewritten "
            f"from its first missing shard on. Delete {', '.join(later[:3])}{' ...' if len(later) > 3 else ''} too and rerun "
            "the same command to rewrite them, or start a new directory"
        )
    for s in shards[:cut]:
        path = directory / s["file"]
        size = path.stat().st_size
        if size != s["bytes"] or mf.file_sha256(path) != s["sha256"]:
            what = f"size {size}, manifest says {s['bytes']}" if size != s["bytes"] else "its SHA-256 differs from the manifest's"
            raise EmbedwalkError(
                f"shard {path} is damaged ({what}), so it cannot be kept for resuming. Delete it and every later "
                f"shard file ({s['file']} .. {shards[-1]['file']}) and rerun the same command: embedwalk rewrites "
                "them byte-identically. Or start a new directory"
            )
    if cut < len(shards):
        dropped = shards[cut:]
        manifest["shards"] = shards[:cut]
        manifest["rows"] -= sum(s["rows"] for s in dropped)
        manifest["prompts"] -= sum(s["prompts"] for s in dropped)
        manifest["bytes"] -= sum(s["bytes"] for s in dropped)
        manifest["complete"] = False
        mf.write_json_atomic(directory / mf.MANIFEST, manifest)


def cache_activations(
    model,
    data,
    out: Union[str, Path],
    *,
    hooks: Optional[Sequence[str]] = None,
    layers: Optional[Sequence[int]] = None,
    positions: Positions = "all",
    positions_id: Optional[str] = None,
    dtype: Union[str, torch.dtype] = "bfloat16",
    batch_size: int = 8,
    shard_mb: float = 128.0,
    shard_rows: Optional[int] = None,
    metadata: Optional[Sequence] = None,
    text_field: str = "text",
    attention_mask: Optional[Tensor] = None,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    readers: Iterable[Reader] = (),
    queue_size: int = 4,
    progress: Optional[bool] = None,
):
    """Run ``model`` over ``data`` and store ``hooks`` at ``positions`` in ``out``; resume if interrupted.

    Returns the :class:`~embedwalk.store.ActivationStore` (the rank's own store under
    torchrun; :func:`~embedwalk.store.merge` joins the ranks). ``readers`` are extra embedwalk
    Readers fed by the same forward passes.

    ``positions`` is ``"all"``, ``"last"`` or a function ``(tokens, mask) -> bool mask``; a
    function enters the configuration by what it computes (code, constants, defaults, closure
    and global values), and one whose identity cannot be established must be named with
    ``positions_id``. It must return a ``bool`` mask ``[batch, pos]`` (integer indices are
    refused). Prompts where it selects nothing are recorded with zero rows; a run where it
    selects no row at all raises :class:`EmbedwalkError` (an empty store is never written
    as if complete). Rerunning into ``out`` resumes only the same configuration and data:
    kept shards are checked against their SHA-256, a complete store is returned only for the
    same data, anything else raises :class:`EmbedwalkError`. Deleted trailing shards are
    rewritten (byte-identical).

    ``dtype`` is the storage dtype of the vectors: ``"bfloat16"`` (default; float32's range,
    8 significant bits), ``"float16"`` (11 significant bits, magnitudes up to 65504) or
    ``"float32"``. A store never holds ``inf`` or NaN: a value the cast to ``dtype`` would
    turn into ``inf`` (in float16, any magnitude from 65520 on) raises :class:`EmbedwalkError`
    naming the hook, the prompt (index and text), the position (counted from the first real
    token, as stored), the dimension and the value, with the fix (``dtype=torch.float32`` or
    ``torch.bfloat16``, into a new directory); so does an ``inf``/NaN the model's own forward
    produced, in every dtype, saying it is not a storage-precision problem. The check runs
    before the batch reaches the shard writer, so the directory keeps only the shards finished
    before that batch: a valid store, ``open_store(out, allow_partial=True)``. The hook is
    refused, not silently written wider: a store's dtype is part of its configuration, and a
    hook cannot change dtype part-way through shards already written.
    """
    from embedwalk import __version__
    from embedwalk.store.reader import ActivationStore

    adapter = adapt(model)
    if batch_size < 1:
        raise EmbedwalkError(f"batch_size must be at least 1, got {batch_size}")
    store_dtype = mf.storage_dtype(dtype)
    rank, world_size = resolve_rank(rank, world_size)
    entries = plan_hooks(adapter, hooks, layers)
    row_bytes = len(entries) * adapter.d_model * store_dtype.itemsize + 16
    shard_rows = int(shard_rows or max(1, shard_mb * 2**20 // row_bytes))
    config = {
        "model": mf.model_identity(adapter),
        "hooks": [e["name"] for e in entries],
        "requested_hooks": list(hooks) if hooks is not None else None,
        "layers": list(layers) if layers is not None else None,
        "positions": _positions_id(positions, positions_id),
        "dtype": str(store_dtype).replace("torch.", ""),
        "batch_size": batch_size, "shard_rows": shard_rows, "text_field": text_field,
        "prepend_bos": prepend_bos, "padding_side": padding_side, "world_size": world_size,
    }
    root = Path(out)
    directory = root / rank_dir(rank, world_size) if world_size > 1 else root
    manifest = _prepare(directory, {
        "format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "library_version": __version__,
        "config": config, "config_hash": mf.config_hash(config), "hooks": entries,
        "d_model": adapter.d_model, "dtype": config["dtype"], "rank": rank, "world_size": world_size,
        "shards": [], "rows": 0, "prompts": 0, "bytes": 0, "complete": False,
    })
    items = ((i, p, m) for i, (p, m) in enumerate(iter_items(data, text_field=text_field, attention_mask=attention_mask, metadata=metadata)) if i % world_size == rank)
    _skip(items, manifest["shards"], directory)
    if manifest["complete"]:
        # The shards cover the same prompts (checked above); the data must not go on past them.
        if next(items, None) is not None:
            raise EmbedwalkError(
                f"{directory} holds a complete store of {manifest['prompts']} prompts, but the data given now has "
                "more; it is another collection. Use a new out directory (or delete this one to rewrite it)"
            )
        return ActivationStore(directory)

    writer = _ShardWriter(directory, manifest, shard_rows, queue_size)
    gather = _Gather(entries, positions, store_dtype, lambda chunk, rows, extra: writer.put((chunk, rows, extra)), directory)
    parties = [gather, *readers]

    total = len(data) if hasattr(data, "__len__") and not isinstance(data, (str, Path)) else None
    from embedwalk.progress import progress_bar

    # Hidden until the call has run show_after() seconds, like every embedwalk bar.
    bar = progress_bar(total=None if total is None else -(-(total - rank) // world_size), initial=manifest["prompts"],
                       unit="prompt", desc="embedwalk cache", progress=progress) if progress is not False else None
    for r in parties:
        r.start(adapter)
    ctx_ref: list = [None]
    writer.start()
    ok = False
    n_tokens, t0 = 0, time.perf_counter()
    try:
        with eval_mode(adapter.model), torch.no_grad(), attached(adapter, parties, [], ctx_ref) as fired:
            first = True
            while True:
                chunk = [next(items, None) for _ in range(batch_size)]
                chunk = [c for c in chunk if c is not None]
                if not chunk:
                    break
                payloads = [p for _, p, _ in chunk]
                if isinstance(payloads[0], Tensor):
                    width = max(len(p) for p in payloads)
                    toks = torch.full((len(payloads), width), adapter.pad_token_id, dtype=torch.long)
                    mask = torch.zeros_like(toks, dtype=torch.bool)
                    for j, p in enumerate(payloads):
                        toks[j, : len(p)], mask[j, : len(p)] = p, True
                    batch = next(make_batches(adapter, toks, mask, batch_size=len(chunk), progress=False))
                else:
                    batch = next(make_batches(adapter, payloads, batch_size=len(chunk), prepend_bos=prepend_bos, padding_side=padding_side, progress=False))
                gather.ids = [i for i, _, _ in chunk]
                gather.texts = payloads
                gather.extra = {"ids": gather.ids, "meta": [m for _, _, m in chunk], "digests": [item_digest(p, m) for _, p, m in chunk]}
                batch = batch.to(adapter.device)
                ctx = Context(adapter, batch)
                ctx_ref[0] = ctx
                forward(adapter, batch)
                if first:
                    fired.check()
                    first = False
                for r in parties:
                    r.end_batch(ctx)
                n_tokens += int(batch.mask.sum())
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix({"tok/s": f"{n_tokens / (time.perf_counter() - t0):.0f}", "written": f"{writer.bytes_written / 2**20:.1f} MB"}, refresh=False)
        writer.close(flush=True)
        ok = True
        if manifest["rows"] == 0 and world_size == 1:  # one rank of several may hold none; the merge counts them
            raise EmbedwalkError(
                f"positions selected no rows in any of the {manifest['prompts']} prompts, so there is nothing to "
                f"store in {directory}; check the positions function (it returns a bool mask [batch, pos]; pad "
                "positions are never selected) and delete that directory before rerunning"
            )
    finally:
        if not ok:
            writer.close(flush=False)
        if bar is not None:
            bar.close()
    manifest["complete"] = True
    mf.write_json_atomic(directory / mf.MANIFEST, manifest)
    store = ActivationStore(directory)
    store.write_metadata_table()
    _maybe_merge_under_torchrun(root, world_size, rank)
    return store


def _skip(items, shards: list[dict], directory: Path) -> None:
    """Consume the prompts complete shards already cover, proving they are the same prompts."""
    for s in shards:
        h = hashlib.sha256()
        for k in range(s["prompts"]):
            nxt = next(items, None)
            if nxt is None:
                raise EmbedwalkError(f"the data end after {k} prompts of {s['file']}, but the store in {directory} covers more; is it the same collection?")
            _, p, m = nxt
            h.update(item_digest(p, m))
        if h.hexdigest() != s["data_sha256"]:
            raise EmbedwalkError(
                f"the prompts of {s['file']} in {directory} differ from the data given now; the store was written "
                "from another collection (or another order). Use a new --out directory"
            )


def _maybe_merge_under_torchrun(root: Path, world_size: int, rank: int) -> None:
    """With a live process group (torchrun + init_process_group), rank 0 merges once all ranks are done."""
    import torch.distributed as dist

    if world_size < 2 or not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    if rank == 0:
        from embedwalk.store.distributed import merge

        merge(root)
    dist.barrier()
