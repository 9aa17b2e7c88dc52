"""``embedwalk cache``: store activations of a text collection; rerun the same command to resume."""

from __future__ import annotations

import argparse

from embedwalk.cli_args import add_model_arguments, model_from_args


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "cache",
        help="store activations of a text collection on disk (resumable)",
        description="Run a model over a collection and store chosen hooks at chosen positions as "
        "safetensors shards. Rerunning the same command resumes after the last complete shard.",
    )
    add_model_arguments(p)
    p.add_argument("--data", help="a text file (one prompt per line) or a .jsonl file")
    p.add_argument("--text-field", default="text", help="the text field of JSONL rows (others become metadata)")
    p.add_argument("--hooks", default=None, help="comma-separated: resid_post.5,final,final_normed,blocks.3.hook_resid_mid ...")
    p.add_argument("--layers", default=None, help="comma-separated layers for resid_post hooks (default: all) when --hooks is not given")
    p.add_argument("--positions", default="all", choices=["all", "last"], help="every non-pad token, or the last one of each prompt")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="storage type of the vectors (default bfloat16)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--shard-mb", type=float, default=128.0, help="size of each shard file in MB (default 128)")
    p.add_argument("--rank", type=int, default=None, help="this worker's rank (default: $RANK)")
    p.add_argument("--world-size", type=int, default=None, help="number of workers (default: $WORLD_SIZE)")
    p.add_argument("--merge", action="store_true", help="join the rank folders under --out into one store and exit")
    p.add_argument("--out", required=True, help="the store directory")
    p.set_defaults(func=_run)


def _ints(text):
    return None if text is None else [int(x) for x in text.split(",") if x.strip()]


def _run(args: argparse.Namespace) -> int:
    from embedwalk.errors import EmbedwalkError
    from embedwalk.store import cache_activations, merge

    if args.merge:
        store = merge(args.out)
        print(store)
        return 0
    if not args.data:
        raise EmbedwalkError("--data is required: a text file (one prompt per line) or a .jsonl file")

    model = model_from_args(args)
    store = cache_activations(
        model, args.data, args.out,
        hooks=[h.strip() for h in args.hooks.split(",")] if args.hooks else None,
        layers=_ints(args.layers), positions=args.positions, dtype=args.dtype,
        batch_size=args.batch_size, shard_mb=args.shard_mb, text_field=args.text_field,
        rank=args.rank, world_size=args.world_size,
    )
    print(store)
    return 0


def main(argv=None) -> int:
    """``python -m embedwalk.store.cli cache ...``: the same command, for launchers (torchrun -m)."""
    from embedwalk.cli import main as embedwalk_main

    return embedwalk_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
