"""Argparse wiring for ``embedwalk priority ...``; the main CLI only calls :func:`add_subparser`."""

from __future__ import annotations

import argparse

from embedwalk.cli_args import add_model_arguments, model_from_args


def add_subparser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``priority reproduce`` to the main CLI's subparsers.

    Each leaf sets ``func``; the main CLI runs ``return args.func(args)``.
    """
    priority = subparsers.add_parser("priority", help="token-priority graphs (Li et al., AISTATS 2024)")
    sub = priority.add_subparsers(dest="priority_command", metavar="{reproduce,heads}")
    sub.required = True
    rep = sub.add_parser(
        "reproduce",
        help="reproduce the paper's synthetic experiments and compare with its numbers",
        description="Train the single-layer model on random cyclic/acyclic data sets and print "
        "corr(W, W_svm), the finite-component gap and the attention mass on the top SCC next to "
        "the paper's values. Exit status 1 if a checked value misses its target.",
    )
    add_reproduce_arguments(rep)
    rep.set_defaults(func=_reproduce)

    heads = sub.add_parser(
        "heads",
        help="score every attention head of a model for hard retrieval and soft composition",
        description="Build token-priority graphs from the text (query token -> next token) and print, "
        "per head, the attention mass on the predicted top-priority tokens against uniform aggregation.",
    )
    heads.add_argument("text", nargs="*", help="text to read (or use --text-file)")
    heads.add_argument("--text-file", help="a text file, one passage per line")
    add_model_arguments(heads)
    heads.add_argument("--top", type=int, default=15, help="rows to print, highest ratio first")
    heads.add_argument("--png", help="write the layer x head heatmap here")
    heads.add_argument("--csv", help="write the full table here")
    heads.set_defaults(func=_heads)
    return priority


def add_reproduce_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``priority reproduce`` (here, so that ``--help`` imports no numpy or torch)."""
    p.add_argument("--setting", choices=["cyclic", "acyclic", "both"], default="both",
                   help="which of the paper's synthetic settings to run (default: both)")
    p.add_argument("--datasets", type=int, default=10, help="random data sets per setting (paper: 10)")
    p.add_argument("--iterations", type=int, default=4000, help="normalised-GD steps (paper: 4000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data sets and initialisations (default 0)")
    p.add_argument("--plot", metavar="PATH", default=None, help="save the training curves to PATH (png/pdf)")


def _reproduce(args) -> int:
    from .reproduce import cli

    return cli(args)


def _heads(args) -> int:
    from pathlib import Path

    from embedwalk.errors import EmbedwalkError

    from .model import head_priority

    texts = list(args.text)
    if args.text_file:
        texts += [line for line in Path(args.text_file).read_text().splitlines() if line.strip()]
    if not texts:
        raise EmbedwalkError("give text to read: embedwalk priority heads \"some text\" or --text-file FILE")
    model = model_from_args(args)
    result = head_priority(model, texts)
    df = result.to_dataframe().sort_values("ratio", ascending=False)
    print(df.head(args.top).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.csv:
        df.to_csv(args.csv, index=False)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        result.plot("ratio").savefig(args.png, dpi=120, bbox_inches="tight")
        print(f"figure written to {args.png}")
    return 0
