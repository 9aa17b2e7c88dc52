"""The ``embedwalk`` command."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each capability registers its own subcommands; a module that is absent is skipped.
_SUBCOMMAND_MODULES = [
    "embedwalk.demo",
    "embedwalk.lenses.cli",
    "embedwalk.association.cli",
    "embedwalk.store.cli",
    "embedwalk.concepts.cli",
    "embedwalk.priority.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedwalk",
        description="Read the embedding-space walk of TransformerLens models.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue
            raise
        module.add_subparser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from embedwalk import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from embedwalk.errors import EmbedwalkError

    try:
        return int(args.func(args) or 0)
    except EmbedwalkError as e:
        return _user_error(str(e))
    except OSError as e:
        # A file or folder the user named that cannot be read or written; other OSErrors are
        # ours and keep their traceback.
        if e.filename is None or not isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)):
            raise
        return _user_error(f"{e.strerror}: {e.filename}")
    except KeyboardInterrupt:
        print("embedwalk: interrupted", file=sys.stderr)
        return 130


def _user_error(message: str) -> int:
    """argparse's convention: ``embedwalk: error: ...`` on stderr and exit status 2."""
    print(f"embedwalk: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
