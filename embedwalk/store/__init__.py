"""Activation store: cache activations of a collection to disk once, read them back fast.

Write (one forward pass per batch; a background thread writes shards; rerun to resume)::

    from embedwalk.store import cache_activations, open_store, merge

    store = cache_activations(model, ["The capital of France is", ...], "acts/",
                              layers=[4, 8], positions="last", dtype="bfloat16",
                              metadata=[{"label": 1}, ...])

``hooks`` takes 'resid_post.<l>' (and resid_pre/resid_mid/attn_out/mlp_out), 'embed',
'final' (the composite vector the final norm reads), 'final_normed' (after the model's own final
norm) or TL hook names; the default is ``resid_post`` at ``layers`` (all when None) plus 'final'.
Hook names that share one tensor are stored once and recorded as aliases. ``positions`` is
'all' (every non-pad token), 'last' (last non-pad token) or ``fn(tokens, mask) -> bool mask``.

Read (memory-mapped, zero-copy when rows are contiguous)::

    store = open_store("acts/")
    for batch in store.batches(hooks=["resid_post.8"], batch_size=4096, shuffle=True,
                               where={"label": [0, 1]}):
        x = batch["blocks.8.hook_resid_post"]      # or batch.vectors[...]; [n, d_model]
        y = torch.tensor(batch.meta["label"])      # per-row metadata columns, lists
        batch.prompt, batch.position, batch.tokens # int tensors [n]

``store.get(rows, hooks)`` is random access; ``store.prompts`` the per-prompt metadata table;
``store.to_dataframe(slice(0, 100))`` a tidy frame; ``store.verify()`` checks every checksum.
Each batch's ``vectors`` keys are the stored hook names (``store.hooks``); any alias works in
``hooks=`` and in ``batch[...]`` only by its stored name.

Format: ``manifest.json`` + ``shard-NNNNN.safetensors`` (columns ``tokens``, ``prompt``,
``position``, ``act.<hook>``; per-prompt metadata as JSON in the safetensors header) +
``metadata.parquet``. No pickle anywhere.
"""

from embedwalk._lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "embedwalk.store.distributed": ["merge"],
    "embedwalk.store.reader": ["ActivationStore", "StoreBatch", "open_store"],
    "embedwalk.store.writer": ["cache_activations", "plan_hooks"],
})
