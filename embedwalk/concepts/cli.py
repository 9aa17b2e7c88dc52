"""``embedwalk concepts``: fit a regression from an activation store, run the multiple-choice tests."""

from __future__ import annotations

import argparse

from embedwalk.cli_args import add_model_arguments, model_from_args


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("concepts", help="concept-space regressions and the paper's multiple-choice tests")
    sub = p.add_subparsers(dest="concepts_command", metavar="SUBCOMMAND")

    f = sub.add_parser("fit", help="fit a cross-validated ridge regression from an activation store",
                       description="Stream a store once into per-fold statistics and fit ridge "
                       "regression with per-target alpha chosen by group-fold CV.")
    f.add_argument("--store", required=True, help="the store directory (embedwalk cache --out)")
    f.add_argument("--x", required=True, help="stored hook for the inputs, e.g. resid_post.8")
    f.add_argument("--y", required=True, help="a stored hook, or meta:COL[,COL] (metadata columns; "
                   "text columns are one-hot encoded)")
    f.add_argument("--reverse", action="store_true", help="swap the sides: regress the x vectors on y")
    f.add_argument("--group", default="prompt", help="fold groups: 'prompt' (default) or a metadata column")
    f.add_argument("--folds", type=int, default=5, help="cross-validation folds over the groups (default 5)")
    f.add_argument("--alphas", default=None, help="comma-separated ridge strengths (default: a grid "
                   "scaled to the data)")
    f.add_argument("--batch-size", type=int, default=4096, help="rows read from the store at once (default 4096)")
    f.add_argument("--out", default=None, help="save the fit here (.safetensors)")
    f.set_defaults(func=_fit)

    m = sub.add_parser("mc", help="the concept-similarity and concept-generation tests on the "
                       "multiple-choice set, against full-context scoring and chance")
    add_model_arguments(m)
    m.add_argument("--readout", type=_readout, default=-1, help="readout for the similarity summary: "
                   "an index (0 = embedding, l+1 = output of block l, -1 = last block) or a label")
    m.add_argument("--gen-readout", type=_readout, default=0, help="readout of the vectors fed as "
                   "input embeddings, index or label (default 0: token-embedding space)")
    # renamed --readout / --gen-readout (they counted readouts, not blocks): refused with a message
    m.add_argument("--layer", default=None, help=argparse.SUPPRESS)
    m.add_argument("--gen-layer", default=None, help=argparse.SUPPRESS)
    m.add_argument("--reduction", default="mean", choices=["mean", "weighted", "last"], help="reduction of each answer's token vectors to one concept vector, for the summary and the generation test (default mean)")
    m.add_argument("--limit", type=int, default=None, help="use the first N items")
    m.add_argument("--data", default=None, help="a JSONL file of items (default: the shipped set)")
    m.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    m.add_argument("--csv", default=None, help="write the long-form accuracy table here")
    m.set_defaults(func=_mc)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _fit(args: argparse.Namespace) -> int:
    from embedwalk.concepts.experiments import fit_from_store

    alphas = None if args.alphas is None else [float(a) for a in args.alphas.split(",")]
    fit, info = fit_from_store(args.store, args.x, args.y, reverse=args.reverse, group=args.group,
                               n_folds=args.folds, alphas=alphas, batch_size=args.batch_size)
    df = fit.to_dataframe()
    print(df.head(20).to_string(index=False))
    if len(df) > 20:
        print(f"... {len(df)} targets")
    print(f"rows {info['rows']}  pass {info['seconds_pass']:.2f} s ({info['rows_per_s']:.0f} rows/s)  "
          f"held-out R² (all targets) {fit.cv_r2_overall:.4f}")
    if args.out:
        fit.save(args.out)
        print(f"saved {args.out}")
    return 0


def _readout(text: str):
    """A readout index (an integer, negative from the end) or a label such as 'embed'."""
    return int(text) if text.lstrip("-").isdigit() else text


def _mc(args: argparse.Namespace) -> int:
    import json

    from embedwalk.lenses.logit import refuse_layers

    from embedwalk.concepts.experiments import multiple_choice

    refuse_layers("`embedwalk concepts mc` (use --readout)", args.layer, old="--layer", new="--readout")
    refuse_layers("`embedwalk concepts mc` (use --gen-readout)", args.gen_layer, old="--gen-layer", new="--gen-readout")
    model = model_from_args(args)
    items = None
    if args.data:
        with open(args.data, encoding="utf-8") as fh:
            items = [json.loads(line) for line in fh if line.strip()]
    if args.limit:
        from embedwalk.concepts.datasets import load_dataset

        items = (items or load_dataset("multiple_choice"))[: args.limit]
    res = multiple_choice(model, items, readout=args.readout, gen_readout=args.gen_readout,
                          reduction=args.reduction, batch_size=args.batch_size)
    print(res.summary().to_string(index=False))
    if args.csv:
        res.to_dataframe().to_csv(args.csv, index=False)
    return 0
