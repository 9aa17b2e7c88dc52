"""The model options every CLI subcommand shares (``--model``, ``--generation``, ``--device``).

Kept apart from :mod:`embedwalk.models` so that building the parser (``embedwalk --help``)
imports neither torch nor TransformerLens; the model is loaded only when a command runs.
"""

from __future__ import annotations

import argparse


def add_model_arguments(parser, *, suppress: bool = False) -> None:
    """``--model``, ``--generation`` and ``--device`` for a CLI subcommand; read back with
    :func:`model_from_args`. ``suppress`` leaves unset options off the namespace, so a value
    given to a parent parser is not overwritten by this one's default."""
    unset = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument("--model", **(unset or {"default": "smollm2"}),
                        help="smollm2 (default), a .gguf file, an HF folder or hub name, or tiny-gpt2 / tiny-llama")
    parser.add_argument("--generation", **(unset or {"default": None}), choices=["bridge", "hooked"],
                        help="TL 4 bridge or TL 2/3 HookedTransformer (default: the installed one)")
    parser.add_argument("--device", **(unset or {"default": None}), help="cpu or cuda (default: cuda when present)")


def model_from_args(args):
    """Load the model named by the options :func:`add_model_arguments` added."""
    from embedwalk.models import load_model

    return load_model(getattr(args, "model", None) or "smollm2", generation=getattr(args, "generation", None),
                      device=getattr(args, "device", None))
