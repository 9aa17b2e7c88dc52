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

    problem = _unwritable_output(args)
    if problem:  # before a model loads or a run starts: its results would be lost at the end
        return _user_error(problem)
    try:
        return int(args.func(args) or 0)
    except EmbedwalkError as e:
        return _user_error(str(e))
    except OSError as e:
        # A file or folder the user named that cannot be read or written; other OSErrors are
        # ours and keep their traceback.
        if e.filename is None or not isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)):
            raise
        return _user_error(f"cannot write {e.filename}: {e.strerror}" if _writing(e) else f"{e.strerror}: {e.filename}")
    except KeyboardInterrupt:
        print("embedwalk: interrupted", file=sys.stderr)
        return 130


def _writing(e: OSError) -> bool:
    return isinstance(e, (PermissionError, IsADirectoryError, FileExistsError))


# Every subcommand's output-file options; checked once here, before any work.
_OUTPUT_OPTIONS = ("csv", "plot", "png")


def _unwritable_output(args) -> str:
    """Why an output file named on the command line cannot be written ('' when it can)."""
    import os
    from pathlib import Path

    for dest in _OUTPUT_OPTIONS:
        value = getattr(args, dest, None)
        if not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser()
        folder = path.parent
        flag = f"--{dest}"
        if path.is_dir():
            return f"cannot write {value} ({flag}): it is a folder; name a file in it"
        if not folder.is_dir():
            return f"cannot write {value} ({flag}): the folder {folder} does not exist; create it or choose another path"
        if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            return f"cannot write {value} ({flag}): permission denied; choose a writable path"
    return ""


def _user_error(message: str) -> int:
    """argparse's convention: ``embedwalk: error: ...`` on stderr and exit status 2."""
    print(f"embedwalk: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
