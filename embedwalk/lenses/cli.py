"""``embedwalk lens ...``: logit lens and tuned-lens training from the command line.

Other lens modules add their subcommands through ``LENS_SUBCOMMAND_MODULES``: each listed
module that exists gets ``add_lens_subparsers(lens_subparsers)`` called.
"""

from __future__ import annotations

import argparse
import importlib

from embedwalk.cli_args import add_model_arguments, model_from_args
from embedwalk.errors import EmbedwalkError

# Modules that register more `embedwalk lens <name>` subcommands (walk, decompose, decode).
LENS_SUBCOMMAND_MODULES = ["embedwalk.lenses.cli_walk"]


def _readouts(text):
    """``--readouts embed,0,3`` -> ``['embed', 0, 3]`` (indices as ints, labels as strings); None for all."""
    if text is None:
        return None
    items = [x.strip() for x in text.split(",")]
    if not all(items):
        raise EmbedwalkError(f"--readouts {text!r} has an empty item; write readout indices or labels separated by commas, e.g. --readouts embed,0")
    return [int(x) if x.lstrip("-").isdigit() else x for x in items]


def _plus_one(layers: str) -> str:
    """The --readouts spelling of block outputs given as --layers (block l -> readout l + 1)."""
    try:
        return ",".join(str(int(x) + 1) for x in layers.split(","))
    except ValueError:
        return "1,2"


def _logit(args) -> int:
    from embedwalk.lenses.logit import logit_lens
    from embedwalk.lenses.tuned import TunedLens

    readouts = _readouts(args.readouts)
    model = model_from_args(args)
    translator = TunedLens.load(args.tuned, model) if args.tuned else None
    positions = "last" if args.last else None
    targets = args.target
    if args.last and targets is None:
        # The last position has no next token: follow the model's own final prediction there
        # instead, so each row says at which layer that prediction emerges.
        first = logit_lens(model, args.text, positions="last", top_k=1, chunk_size=args.chunk_size)
        targets = first.top_ids[-1, :, 0].tolist()
        print("target: the model's own top-1 prediction at the last position (--target to choose another)")
    res = logit_lens(model, args.text, positions=positions, targets=targets, top_k=args.top_k,
                     mid=args.mid, readouts=readouts, translator=translator, chunk_size=args.chunk_size,
                     fused={"auto": None, "on": True, "off": False}[args.fused])
    df = res.to_dataframe()
    if args.csv:
        df.to_csv(args.csv, index=False)
        print(f"wrote {len(df)} rows to {args.csv}")
    cols = ["prompt", "pos", "layer", "token", "top1_token", "top1_prob", "target", "target_logprob", "target_rank", "entropy", "kl_to_final"]
    shown = df if args.last else df[df.pos == df.groupby("prompt").pos.transform("max")]
    print(shown[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.plot:
        from embedwalk.figures import save_figure

        save_figure(res.plot(args.metric), args.plot)
        print(f"saved figure to {args.plot}")
    return 0


def _tuned_train(args) -> int:
    from pathlib import Path

    from embedwalk.lenses.logit import logit_lens
    from embedwalk.lenses.tuned import sample_text, train_tuned_lens

    if args.layers is not None:  # before the model loads: a typo should not cost a download
        raise EmbedwalkError(
            "`embedwalk lens tuned-train --layers` was renamed --readouts (it counted readouts, not blocks: "
            f"0 = embedding, l + 1 = output of block l). Use e.g. --readouts embed,0 or --readouts {_plus_one(args.layers)}"
        )
    readouts = _readouts(args.readouts)
    model = model_from_args(args)
    if args.text_file:
        paragraphs = [p for p in Path(args.text_file).read_text(encoding="utf-8").split("\n\n") if p.strip()]
        cut = max(1, int(0.8 * len(paragraphs)))
        train, heldout = paragraphs[:cut], paragraphs[cut:]
    else:
        train, heldout = sample_text("train"), sample_text("heldout")
    lens = train_tuned_lens(model, train, readouts=readouts, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, step_tokens=args.step_tokens)
    lens.save(args.out)
    print(f"saved tuned lens to {args.out}")
    if heldout:
        plain = logit_lens(model, heldout, readouts=readouts).layer_means()
        tuned = logit_lens(model, heldout, readouts=readouts, translator=lens)
        print("held-out mean KL(final || readout), nats:")
        for label, a, b in zip(tuned.labels, plain.tolist(), tuned.layer_means().tolist()):
            print(f"  {label:>6}  logit {a:8.3f}   tuned {b:8.3f}")
    return 0


def add_subparser(subparsers) -> None:
    lens = subparsers.add_parser("lens", help="lenses on the residual stream (logit, tuned, ...)")
    sub = lens.add_subparsers(dest="lens_command", metavar="LENS")
    lens.set_defaults(func=lambda args: lens.print_help() or 0)

    p = sub.add_parser("logit", help="logit (or tuned) lens of a text: top tokens, target rank, entropy, KL per layer")
    add_model_arguments(p)
    p.add_argument("text", nargs="+", help="one or more prompts")
    p.add_argument("--target", default=None, help="a one-token target string for every position (default: the next token; with --last, "
                   "the model's own top-1 prediction there)")
    p.add_argument("--last", action="store_true", help="only the last position of each prompt")
    p.add_argument("--top-k", type=int, default=5, help="top tokens kept per (readout, position) (default 5)")
    p.add_argument("--mid", action="store_true", help="also read each block's midpoint (after attention)")
    p.add_argument("--tuned", default=None, help="folder of a tuned lens to use as translator")
    p.add_argument("--chunk-size", type=int, default=None, help="(readout, position) rows per unembedding GEMM (default 1024)")
    p.add_argument("--fused", choices=["auto", "on", "off"], default="auto",
                   help="reduce the logits with one torch.compile kernel: auto = on CUDA only (default)")
    p.add_argument("--readouts", default=None, help="comma-separated readout indices (0 = embedding, l+1 = output of block l) or labels to read (default: all)")
    p.add_argument("--csv", default=None, help="write the full data frame here")
    p.add_argument("--plot", default=None, help="save the heatmap of prompt 0 here (png/pdf)")
    p.add_argument("--metric", default="kl_to_final", help="heatmap metric (kl_to_final, entropy, target_logprob, ...)")
    p.set_defaults(func=_logit)

    p = sub.add_parser("tuned-train", help="train a tuned lens and report held-out KL against the logit lens")
    add_model_arguments(p)
    p.add_argument("--text-file", default=None, help="UTF-8 text, paragraphs separated by blank lines (default: embedwalk's sample prose)")
    p.add_argument("--out", required=True, help="folder to write tuned_lens.safetensors + config.json")
    p.add_argument("--readouts", default=None, help="comma-separated readout indices (0 = embedding, l+1 = output of block l) or labels to train (default: all)")
    p.add_argument("--layers", default=None, help=argparse.SUPPRESS)  # renamed --readouts: refused with a message
    p.add_argument("--epochs", type=int, default=2, help="passes over the training text (default 2)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"], help="optimizer of the translators (default adam)")
    p.add_argument("--step-tokens", type=int, default=128, help="tokens per optimisation step (default 128)")
    p.set_defaults(func=_tuned_train)

    for name in LENS_SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.add_lens_subparsers(sub)
