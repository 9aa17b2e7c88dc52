"""One forward pass, many readers and writers.

A *reader* is attached to hook points and reduces what it sees on the fly (a lens never asks
for a cache). A *writer* edits a hook's value (an intervention such as the uniform-attention
swap). ``run`` composes any number of both in a single forward pass per batch; at a hook
point that has both, the writers go first so the readers see the edited value. A writer may
also *bypass* an attention module for the run, replacing its forward with a cheaper one that
fires fewer hook points (the uniform swap skips the query-key path); a bypass is never
installed where any reader, writer or user hook watches a hook point it would silence.

Hooks are registered as plain torch forward hooks on the model's ``HookPoint`` modules; hooks
and bypasses are always removed afterwards, also when a reader raises; the model's train/eval
mode is restored and no gradient is recorded through the model.

Every requested hook point must fire. Hook points TransformerLens only runs behind a config
flag (``hook_result``, ``hook_attn_in``, ``hook_q/k/v_input``, ``hook_mlp_in``) are refused up
front, naming the ``set_use_*`` call that turns them on (the rule of TransformerLens's own
``add_hook``). After the first batch, ``run`` raises naming every requested hook point that did
not fire, so neither a reader that sees nothing nor a writer whose edit never happens passes
silently. A point a writer's own bypass silences counts as served: the bypass makes the edit.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from embedwalk import progress as _progress
from embedwalk.adapter import ModelAdapter, adapt, eval_mode
from embedwalk.errors import EmbedwalkError
from embedwalk.inputs import Batch, Inputs, batches
from embedwalk.mixing import Bypass

__all__ = ["Reader", "Writer", "Context", "run", "attached", "gated_hook_flag"]

# (suffix of the hook name, cfg flag that makes TransformerLens run it): TransformerLens 3's
# HookedTransformer.check_hooks_to_add and TransformerLens 4's TransformerBridge._gated_hook_reason
# apply the same rules; both models have a ``set_<flag>(True)`` method.
_GATED = (
    (("attn.hook_result",), "use_attn_result"),
    (("hook_q_input", "hook_k_input", "hook_v_input"), "use_split_qkv_input"),
    (("mlp_in",), "use_hook_mlp_in"),
    (("attn_in",), "use_attn_in"),
)


def gated_hook_flag(model, name: str) -> Optional[str]:
    """The config flag that is off and keeps ``model`` from running hook point ``name``, or None."""
    cfg = getattr(model, "cfg", None)
    for suffixes, flag in _GATED:
        if name.endswith(suffixes) and not getattr(cfg, flag, False):
            return flag
    return None


@dataclass
class Context:
    """What a reader or writer knows about the batch being processed."""

    adapter: ModelAdapter
    batch: Batch
    state: dict = field(default_factory=dict)

    @property
    def mask(self) -> Tensor:
        return self.batch.mask

    @property
    def tokens(self) -> Tensor:
        return self.batch.tokens


class Reader:
    """Reduces activations at hook points. Subclasses set up in ``hook_points`` and ``read``."""

    #: The part of a batch's time that this reader's ``end_batch`` takes (0: the forward pass
    #: is the work). The progress bar gives the forward pass the rest and the reader this
    #: part, which it fills by calling :func:`embedwalk.progress.advance` as it works.
    end_batch_share: float = 0.0

    def hook_points(self, adapter: ModelAdapter) -> Sequence[str]:
        raise NotImplementedError

    def start(self, adapter: ModelAdapter) -> None:
        """Called once before the first batch."""

    def read(self, name: str, value: Tensor, ctx: Context) -> None:
        raise NotImplementedError

    def end_batch(self, ctx: Context) -> None:
        """Called after each forward pass, when every hook of the batch has fired."""

    def result(self) -> Any:
        return None


class Writer:
    """Edits activations at hook points and returns the new value.

    A writer may also replace whole attention forwards for the run (``bypasses``), e.g. to
    skip work whose result it would overwrite anyway.
    """

    def bypasses(
        self,
        adapter: ModelAdapter,
        *,
        watched: frozenset,
        taken: frozenset,
        ctx: Callable[[], "Context"],
    ) -> list[Bypass]:
        """Forwards to replace for this run; called once, before ``hook_points``.

        ``watched``: the HookPoint modules other readers and writers attach to (a bypass must
        not silence any of them). ``taken``: modules already bypassed by an earlier writer.
        ``ctx()`` returns the current batch's context while the forward runs.
        """
        return []

    def hook_points(self, adapter: ModelAdapter) -> Sequence[str]:
        raise NotImplementedError

    def write(self, name: str, value: Tensor, ctx: Context) -> Tensor:
        raise NotImplementedError


class Fired:
    """Which requested hook points fired; ``check()`` raises naming those that did not."""

    def __init__(self, expected: dict[str, list[str]]):
        self.expected = expected  # hook name -> who asked for it
        self.names: set = set()
        self.track_edits = False  # while True: record which writers changed which values
        self.edited: dict[str, set] = {}
        self.bypassed_by: dict[int, int] = {}  # id(writer) -> forwards it replaced

    def check(self) -> None:
        missing = [n for n in self.expected if n not in self.names]
        if missing:
            who = "; ".join(f"{n} (for {', '.join(self.expected[n])})" for n in missing[:8])
            raise EmbedwalkError(
                f"{len(missing)} requested hook point(s) never fired during the forward pass: {who}. "
                "A reader there saw nothing and a writer there edited nothing. This model does not "
                "run them (a hook point of another architecture, or one TransformerLens gates behind a "
                "cfg flag); choose hook points that fire, e.g. from adapter.hook(kind, layer)"
            )


@contextmanager
def attached(
    adapter: ModelAdapter,
    readers: Sequence[Reader],
    writers: Sequence[Writer],
    ctx_ref: list,
    on_fire: Optional[Callable[[], None]] = None,
):
    """Install the writers' bypasses and one hook per hook point for every reader and writer;
    undo both on exit. Yields a :class:`Fired` record of the hook points that fired.
    ``on_fire`` is called after the parties of each hook point have run (``run`` advances the
    progress bar with it)."""
    model = adapter.model
    # at[real hook] = [(kind, callable, who)]: writers edit the hook itself; readers get the
    # adapter's taps, which turn a canonical hook into what really fires (reshaped or derived).
    at: dict[str, list[tuple[str, Any, str]]] = defaultdict(list)
    for w in writers:
        for name in w.hook_points(adapter):
            if name in model.hook_dict and not adapter.source(name).direct:
                raise adapter.refuse(f"writing to {name}", "that hook point does not fire as itself on this "
                                     f"model ({adapter.source(name).how}), so an edit there would not reach the output")
            at[name].append(("w", w, type(w).__name__))
    for r in readers:
        for name in r.hook_points(adapter):
            for real, fn in adapter.taps(name, lambda value, ctx, r=r, name=name: r.read(name, value, ctx)):
                at[real].append(("r", fn, type(r).__name__))
    gated = [(name, gated_hook_flag(model, name)) for name in at]
    gated = [(name, flag) for name, flag in gated if flag]
    if gated:
        flags = sorted({flag for _, flag in gated})
        raise EmbedwalkError(
            f"hook point(s) {[n for n, _ in gated][:4]} only run when TransformerLens's "
            f"{' / '.join('cfg.' + f for f in flags)} is on, and it is off: they would never fire "
            f"(a writer there would change nothing). Call {'; '.join(f'model.set_{f}(True)' for f in flags)} "
            "before running (it costs memory and time), or attach to another hook point"
        )
    bypassed, owners = _plan_bypasses(adapter, at, writers, ctx_ref)
    unknown = [name for name in at if name not in model.hook_dict]
    if unknown:
        raise EmbedwalkError(f"no such hook point on this model: {unknown[:4]}")
    if any(name.startswith(("ln_final.", "unembed.")) or name == "hook_unembed" for name in at):
        raise EmbedwalkError(
            "readers and writers may not attach to ln_final or unembed hooks: embedwalk calls "
            "those modules itself to read residual vectors"
        )

    # A writer's own bypass may silence its hook points (it makes the edit itself); every other
    # requested point must fire. _plan_bypasses guarantees no bypass silences another party's.
    silenced = set().union(*(b.silent for b in bypassed)) if bypassed else set()
    fired = Fired({
        name: list(dict.fromkeys(who for _, _, who in parties))
        for name, parties in at.items()
        if model.hook_dict[name] not in silenced
    })
    fired.bypassed_by = owners

    def make_hook(name: str, parties: list):
        def hook(module, inputs, output):
            fired.names.add(name)
            ctx = ctx_ref[0]
            value = output
            for kind, party, _ in parties:
                if kind == "w":
                    new = party.write(name, value, ctx)
                    if not isinstance(new, Tensor) or new.shape != value.shape:
                        raise EmbedwalkError(
                            f"writer {type(party).__name__} returned "
                            f"{getattr(new, 'shape', type(new).__name__)} at {name}; expected a "
                            f"tensor of shape {tuple(value.shape)}"
                        )
                    if fired.track_edits and new is not value and not torch.equal(new, value):
                        fired.edited.setdefault(type(party).__name__, set()).add(name)
                    value = new
                else:
                    party(value, ctx)
            if on_fire is not None:
                on_fire()
            return value if value is not output else None

        return hook

    handles = []
    replaced: list[tuple[torch.nn.Module, Any]] = []
    try:
        for b in bypassed:
            replaced.append((b.module, b.module.__dict__.get("forward", _UNSET)))
            # object.__setattr__: TL 4 bridge components forward attribute writes to the wrapped
            # HF module, which would patch the wrong forward.
            object.__setattr__(b.module, "forward", b.forward)
        for name, parties in at.items():
            handles.append(model.hook_dict[name].register_forward_hook(make_hook(name, parties)))
        yield fired
    finally:
        for h in handles:
            h.remove()
        for module, previous in reversed(replaced):
            if previous is _UNSET:
                module.__dict__.pop("forward", None)
            else:
                object.__setattr__(module, "forward", previous)


_UNSET = object()


def _plan_bypasses(adapter: ModelAdapter, at: dict, writers, ctx_ref: list) -> tuple[list[Bypass], dict]:
    """The writers' bypasses; ``at`` maps each real hook point to its parties (``attached``)."""
    hook_dict = adapter.model.hook_dict
    watchers: dict[int, set] = defaultdict(set)  # id(writer) or "readers" -> HookPoint modules
    for name, parties in at.items():
        for kind, party, _ in parties:
            if name in hook_dict:
                watchers[id(party) if kind == "w" else "readers"].add(hook_dict[name])
    # Hooks the user added with TransformerLens (model.add_hook, a hooks() context) are watched
    # too: a bypass must not silence them behind the user's back.
    user = frozenset(hp for hp in set(hook_dict.values()) if hp._forward_hooks or hp._forward_pre_hooks)
    out: list[Bypass] = []
    owners: dict[int, int] = {}  # id(writer) -> how many forwards it replaced
    for w in writers:
        watched = user.union(*(mods for key, mods in watchers.items() if key != id(w)))
        taken = frozenset(b.module for b in out)
        for b in w.bypasses(adapter, watched=watched, taken=taken, ctx=lambda: ctx_ref[0]):
            if b.module in taken or b.silent & watched:
                raise EmbedwalkError(
                    f"writer {type(w).__name__} bypassed {type(b.module).__name__} although it is "
                    "taken or watched; a bypass must respect the watched and taken sets it is given"
                )
            out.append(b)
            owners[id(w)] = owners.get(id(w), 0) + 1
    return out, owners


def _check_edits_landed(fired: Fired, bypassing: list, clean: Tensor, edited: Tensor) -> None:
    editors = sorted(set(fired.edited) | set(bypassing))
    if editors and torch.equal(clean, edited):
        where = "; ".join(f"{w} at {sorted(fired.edited.get(w, ['its bypassed attention']))[:4]}" for w in editors)
        raise EmbedwalkError(
            f"the writers' edits did not reach the output: {where} changed values, but the first batch's logits "
            "are bitwise those of the unedited model. The model does not use the edited values downstream "
            "(or the edit only touched entries that are discarded, such as masked attention scores); edit "
            "another hook point"
        )


def forward(adapter: ModelAdapter, batch: Batch) -> Tensor:
    """The model's own forward pass on a padded batch."""
    mask = batch.mask
    kwargs = {}
    if not bool(mask.all()):
        kwargs["attention_mask"] = mask.long().to(adapter.device)
    return adapter.model(batch.tokens.to(adapter.device), **kwargs)


def run(
    model,
    inputs: Inputs,
    *,
    readers: Iterable[Reader] = (),
    writers: Iterable[Writer] = (),
    attention_mask: Optional[Tensor] = None,
    batch_size: int = 8,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[str] = None,
    progress: Optional[bool] = None,
    on_logits: Optional[Callable[[Tensor, Context], None]] = None,
    check_edits: bool = False,
) -> list[Any]:
    """Run ``model`` over ``inputs`` once, feeding every reader and applying every writer.

    Returns the readers' results in the order given. ``on_logits`` sees the model's own
    output logits of each batch (e.g. to compute a loss) without keeping them.

    Raises :class:`EmbedwalkError` before running for a hook point TransformerLens gates behind
    a cfg flag that is off (naming ``model.set_<flag>(True)``), and after the first batch for
    any requested hook point that did not fire.

    ``check_edits=True`` also proves the writers' edits reach the output: the first batch runs
    once more without readers and writers, and if a writer changed a hooked value (or replaced
    an attention forward) but the logits are bitwise those of the unedited pass, ``run``
    raises naming the writers. It costs one extra forward pass of the first batch, so it is
    off by default; an edit that legitimately changes nothing (e.g. of attention scores the
    causal mask already removed) is reported too.
    """
    adapter = adapt(model)
    readers, writers = list(readers), list(writers)
    for party in readers:
        if not isinstance(party, Reader):
            raise EmbedwalkError(f"readers must be embedwalk Readers, got {type(party).__name__}")
    for party in writers:
        if not isinstance(party, Writer):
            raise EmbedwalkError(f"writers must be embedwalk Writers, got {type(party).__name__}")
    for r in readers:
        r.start(adapter)
    # eval() on the bridge walks ~10k modules and costs ~40 ms (as much again to switch back),
    # which a sweep of hundreds of short runs would pay: switch only when something trains.
    ctx_ref: list = [None]
    with eval_mode(adapter.model):
        stream = batches(
            adapter,
            inputs,
            attention_mask,
            batch_size=batch_size,
            prepend_bos=prepend_bos,
            padding_side=padding_side,
            progress=progress,
        )
        clean = None
        if check_edits and writers:
            first = next(stream, None)
            stream = itertools.chain([first] if first is not None else [], stream)
            if first is not None:
                with torch.no_grad():
                    clean = forward(adapter, first.to(adapter.device))
        # The bar advances inside each batch: the forward pass by the hook points fired (a
        # call of one long batch still shows progress and an ETA), then the readers' own
        # end_batch work, which they report with progress.advance.
        reader_share = min(0.99, max((float(r.end_batch_share) for r in readers), default=0.0))
        fired_now = [0, 1]  # hook points fired in this batch, of how many

        def on_fire():
            fired_now[0] += 1
            _progress.advance(fired_now[0], fired_now[1])

        with torch.no_grad(), attached(adapter, readers, writers, ctx_ref, on_fire=on_fire) as fired:
            fired.track_edits = clean is not None
            bypassing = [type(w).__name__ for w in writers if fired.bypassed_by.get(id(w))]
            fired_now[1] = max(1, len(fired.expected))
            for i, batch in enumerate(stream):
                batch = batch.to(adapter.device)
                ctx = Context(adapter, batch)
                ctx_ref[0] = ctx
                fired_now[0] = 0
                _progress.stage(0.0, 1.0 - reader_share)
                logits = forward(adapter, batch)
                _progress.stage(1.0 - reader_share, 1.0)
                if on_logits is not None:
                    on_logits(logits, ctx)
                if i == 0:
                    fired.check()
                    if clean is not None:
                        _check_edits_landed(fired, bypassing, clean, logits)
                        fired.track_edits, clean = False, None
                del logits
                for r in readers:
                    r.end_batch(ctx)
    return [r.result() for r in readers]

