"""Command line: ``brainsex build``, ``brainsex profiles`` (more subcommands join as stages land)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from brainsex import BrainsexError

__all__ = ["main"]


def _params(pairs: Sequence[Sequence[str]] | None) -> dict:
    from brainsex.profiles import parse_override

    return {k: parse_override(v) for k, v in (pairs or [])}


def main(argv: Sequence[str] | None = None) -> int:
    """The ``brainsex`` command: ``build``, ``profiles``, ``train`` (:func:`brainsex.stages.main_train`), ``bench``.

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit code: 0 success, 1 a chapter failed, 2 bad input (a :class:`~brainsex.BrainsexError`).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "train":
        # training has its own parser (also reachable as `python -m brainsex.train`)
        from brainsex.stages import main_train

        return main_train(args_list[1:])
    if args_list and args_list[0] == "bench":
        # the benchmarks live in benchmarks/ at the repository root (not in the installed package)
        import subprocess

        return subprocess.call([sys.executable, "-m", "benchmarks", *args_list[1:]])
    parser = argparse.ArgumentParser(prog="brainsex", description="Build and run the brainsex book.")
    sub = parser.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="run every chapter with papermill, then build the HTML book")
    b.add_argument("--profile", default="demo", help="parameter profile: demo (default), smoke, paper")
    b.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="override one parameter, e.g. -p epochs 5 (repeatable)")
    b.add_argument("--force", action="store_true", help="re-run chapters even if nothing changed")
    b.add_argument("--root", default=".", help="the book's root (the repository root)")
    b.add_argument("--out", default=None, help="output folder (default: <root>/_build)")
    b.add_argument("--run-dir", default=None, help="run directory (default: <root>/runs/<profile>)")
    b.add_argument("--no-html", action="store_true", help="execute the chapters only")
    b.add_argument("--manifest", default=None, help="data manifest (default: <root>/data_manifest.yaml)")

    sub.add_parser("profiles", help="list the parameter profiles")
    sub.add_parser("train", help="train the SFCN outside the book (see `brainsex train --help`)")
    sub.add_parser("bench", help="run the benchmarks (python -m benchmarks; from the repository root)")

    args = parser.parse_args(args_list)
    try:
        if args.cmd == "build":
            from brainsex.book import NotebookFailed, build

            try:
                build(args.root, args.profile, _params(args.param), force=args.force, out=args.out,
                      run_dir=args.run_dir, html=not args.no_html, manifest=args.manifest)
            except NotebookFailed as exc:
                print(f"brainsex: error: {exc}", file=sys.stderr)
                return 1
        elif args.cmd == "profiles":
            from brainsex.profiles import load_profiles

            for name, prof in load_profiles().items():
                print(f"{name}: {' '.join(str(prof.get('description', '')).split())}")
                for k, v in (prof.get("params") or {}).items():
                    print(f"    {k} = {v}")
    except BrainsexError as exc:
        print(f"brainsex: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
