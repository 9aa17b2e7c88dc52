"""``embedwalk bias ...``: association-bias measurements, the swap sweep and the retraining."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from embedwalk.cli_args import add_model_arguments, model_from_args


def _texts(args) -> list[str]:
    from embedwalk.errors import EmbedwalkError

    texts = list(args.text or [])
    if args.file:
        raw = Path(args.file).read_text(encoding="utf-8")
        texts += [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise EmbedwalkError("give text with --text '...' (repeatable) or --file PATH (paragraphs split on blank lines)")
    return texts


def _model_args(p):
    add_model_arguments(p)
    p.add_argument("--text", action="append", help="a prompt (repeatable)")
    p.add_argument("--file", help="a text file; paragraphs separated by blank lines")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--exclude-self", action="store_true", help="uniform over earlier keys only")


def _sweep(args) -> int:
    from embedwalk.association.measure import sweep

    units = [u.strip() for u in args.units.split(",") if u.strip()]
    res = sweep(model_from_args(args), _texts(args), units=units, exclude_self=args.exclude_self,
                method=args.method, batch_size=args.batch_size, progress=True)
    table = res.table
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.plot:
        from embedwalk.figures import save_figure

        save_figure(res.plot(), args.plot)
    return 0


def _measure(args) -> int:
    from embedwalk.association.measure import association_bias

    res = association_bias(model_from_args(args), _texts(args), exclude_self=args.exclude_self, batch_size=args.batch_size)
    df = res.to_dataframe().pivot_table(index=["layer", "head"], columns="metric", values="value").reset_index()
    print(df.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    n, single = res.n_queries, res.n_single_key
    print("distance = ‖z − z_uniform‖/‖z − c‖ (c: the head's value offset); uniform expectation of self "
          f"attention (mean 1/m) by layer: {', '.join(f'{float(u):.4f}' for u in res.self_uniform)}; over "
          f"{int(n.min()) if int(n.min()) == int(n.max()) else n.tolist()} query positions "
          f"({int(single.max())} reaching a single key excluded: uniform by construction)")
    if args.csv:
        df.to_csv(args.csv, index=False)
    if args.plot:
        from embedwalk.figures import save_figure

        save_figure(res.plot(), args.plot)
    return 0


def _retrain(args) -> int:
    from embedwalk.association.retrain import RetrainConfig, retrain
    from embedwalk.models import check_device

    check_device(args.device)
    cfg = RetrainConfig.scaled(args.scale)
    for key in ("steps", "layers", "d_model", "heads", "kv_heads", "ctx", "batch", "seed", "tokenizer"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    text = Path(args.file).read_text(encoding="utf-8") if args.file else None
    res = retrain(cfg, text=text, device=args.device, verbose=True)
    print(f"final validation loss: standard {res.standard[-1]:.4f}  uniform {res.uniform[-1]:.4f}  gap {res.gap:+.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res.to_json(), indent=1))
    if args.plot:
        from embedwalk.figures import save_figure

        save_figure(res.plot(), args.plot)
    return 0


_RETRAIN_HELP = {
    "steps": "training steps", "layers": "blocks", "d_model": "residual width", "heads": "attention heads",
    "kv_heads": "key-value heads", "ctx": "context length in tokens", "batch": "sequences per step",
    "seed": "seed of the initialisation and data order",
}


def add_subparser(subparsers) -> None:
    bias = subparsers.add_parser("bias", help="association bias: uniform-aggregation swap, sweep, retraining")
    sub = bias.add_subparsers(dest="bias_command", metavar="SUBCOMMAND")
    bias.set_defaults(func=lambda a: bias.print_help() or 0)

    p = sub.add_parser("sweep", help="swap all heads, each layer and each head for uniform aggregation; loss/KL table")
    _model_args(p)
    p.add_argument("--units", default="all,layer", help="comma list of all,layer,head (default all,layer)")
    p.add_argument("--method", default="fast", choices=["fast", "pattern"], help="fast: mean of the values over the reachable keys (bypasses queries and keys); pattern: replace the attention pattern (default fast)")
    p.add_argument("--csv", help="write the table here")
    p.add_argument("--plot", help="write the figure here (.png)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("measure", help="per-head distance from uniform aggregation, ||z - z_uniform|| / ||z - c|| (c: the head's value offset), and self bias")
    _model_args(p)
    p.add_argument("--csv", help="write the per-head table here")
    p.add_argument("--plot", help="write the figure here (.png)")
    p.set_defaults(func=_measure)

    p = sub.add_parser("retrain", help="train standard vs uniform-aggregation models from scratch; loss curves",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="size and steps multiplier (try 8-16 on a GPU)")
    for key, typ in (("steps", int), ("layers", int), ("d_model", int), ("heads", int), ("kv_heads", int),
                     ("ctx", int), ("batch", int), ("seed", int)):
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=typ, default=None,
                       help=f"{_RETRAIN_HELP[key]} (default: from --scale)")
    p.add_argument("--tokenizer", choices=["smollm2", "bytes"], default=None, help="SmolLM2's BPE tokenizer or raw bytes (default smollm2)")
    p.add_argument("--file", help="train on this text instead of the built-in prose")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--json", help="write the loss curves and configuration here (.json)")
    p.add_argument("--plot", help="write the loss-curve figure here (.png)")
    p.set_defaults(func=_retrain)
