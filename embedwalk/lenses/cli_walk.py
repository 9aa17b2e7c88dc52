"""``embedwalk lens walk | decompose | decode``: the walk lenses from the command line."""

from __future__ import annotations

import argparse

from embedwalk.errors import EmbedwalkError
from embedwalk.cli_args import add_model_arguments, model_from_args

__all__ = ["add_lens_subparsers"]


def _common(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, suppress=True)  # a value given to the parent ``lens`` parser stays
    p.add_argument("--png", default=None, help="also save the figure to this PNG file")


def _positions(text: str):
    if text in ("last", "all"):
        return "last" if text == "last" else None
    try:
        return [int(p) for p in text.split(",")]
    except ValueError as e:
        raise EmbedwalkError(f"--positions takes 'last', 'all' or comma-separated ints like 0,-1; got {text!r}") from e


def _print(df, floatfmt: str = "{:.4g}") -> None:
    import pandas as pd

    with pd.option_context("display.max_rows", 500, "display.max_columns", 50, "display.width", 200):
        print(df.to_string(index=False, float_format=floatfmt.format))


def _save(fig, path) -> None:
    if path:
        fig.savefig(path, dpi=120, bbox_inches="tight")
        print(f"figure saved to {path}")


def _walk(args) -> int:
    from embedwalk.lenses.walk import walk_lens

    res = walk_lens(model_from_args(args), args.text, positions=_positions(args.positions), nearest_k=args.k)
    _print(res.summary())
    df = res.to_dataframe()
    first = df[(df.prompt == int(res.prompt[args.index])) & (df.pos == int(res.pos[args.index]))]
    print(f"\nwalk of pos {int(res.pos[args.index])} ({res.token_strs[int(res.token[args.index])]!r}):")
    _print(first[["point", "stage", "norm", "step_norm", "part_norm", "cos_final", "cos_embed",
                  "unembed_top1", "unembed_top1_prob", "embed_top1", "embed_top1_cos"]])
    if args.png:
        _save(res.plot(args.index), args.png)
    return 0


def _decompose(args) -> int:
    from embedwalk.lenses.decompose import decompose

    token = int(args.token) if args.token is not None and args.token.isdigit() else args.token
    res = decompose(model_from_args(args), args.text, layer=args.layer, position=args.position, token=token,
                    stage=args.stage, by_source=not args.no_sources)
    print(f"residual {res.layer}.{res.stage} at pos {res.position} ({res.str_tokens[res.position]!r}); "
          f"{len(res.kinds)} parts, relative reconstruction error {res.relative_error:.2e}")
    capped = "" if res.pre_transform_logit == res.logit else f" ({res.pre_transform_logit:.4f} before the output soft-cap)"
    print(f"logit of {res.token_str!r}: {res.logit:.4f}{capped}; sum of DLAs {res.dla_total:.4f} "
          "(final norm's scale frozen at its value for this vector)\n")
    _print(res.top(args.top))
    print("\nper-layer aggregation (attention) vs filtering (MLP):")
    _print(res.layer_totals())
    if res.source_dla is not None:
        src = res.to_dataframe(by_source=True)
        src = src[src.kind == "head_source"]
        print(f"\ntop {args.top} head x source-position contributions:")
        _print(src.reindex(src.dla.abs().sort_values(ascending=False).index).head(args.top))
    if args.png:
        _save(res.plot(args.top), args.png)
    return 0


def _decode(args) -> int:
    from embedwalk.lenses.decoding import decoding_walk

    walk = decoding_walk(model_from_args(args), args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(f"{args.prompt!r} -> {walk.text!r}  (path log-prob {float(walk.path_logprob[-1]) if len(walk.chosen) else 0.0:.3f})\n")
    _print(walk.steps())
    if args.png and len(walk.chosen):
        _save(walk.plot(), args.png)
    return 0


def add_lens_subparsers(lens_sub) -> None:
    """Add ``walk``, ``decompose`` and ``decode`` to the ``embedwalk lens`` subparsers."""
    p = lens_sub.add_parser("walk", help="the encoding walk of a position through the layers")
    p.add_argument("text", help="the prompt")
    p.add_argument("--positions", default="last", help="'last' (default), 'all', or ints like 0,-1")
    p.add_argument("--k", type=int, default=5, help="nearest tokens kept per walk point")
    p.add_argument("--index", type=int, default=-1, help="which walked position to print and plot")
    _common(p)
    p.set_defaults(func=_walk)

    p = lens_sub.add_parser("decompose", help="exact decomposition of a residual, with direct logit attribution")
    p.add_argument("text", help="the prompt")
    p.add_argument("--layer", type=int, default=-1, help="block whose residual is decomposed (default -1: the last)")
    p.add_argument("--position", type=int, default=-1, help="token position (default -1: the last)")
    p.add_argument("--stage", default="post", choices=["pre", "mid", "post"], help="resid_pre, resid_mid or resid_post of the block (default post)")
    p.add_argument("--token", default=None, help="token (one-token string or id) to attribute; default: the model's prediction")
    p.add_argument("--top", type=int, default=15, help="rows to print")
    p.add_argument("--no-sources", action="store_true", help="skip the per-source-position split of heads")
    _common(p)
    p.set_defaults(func=_decompose)

    p = lens_sub.add_parser("decode", help="generate, recording the walk through embedding space")
    p.add_argument("prompt", help="the prompt to continue")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate (default 20)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only (with --temperature)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this probability mass (with --temperature)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: unseeded)")
    _common(p)
    p.set_defaults(func=_decode)
