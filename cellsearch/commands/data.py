"""``cellsearch data fetch ptb [--dir DIR] [--url URL]`` and ``cellsearch data path ptb``: the Penn Treebank copy.

``fetch`` downloads the public copy (or a mirror's) into the per-user cache or ``--dir``, checking every file
against its known SHA-256 sum; ``path`` prints the directory the ptb task would read when none is given.
"""

from __future__ import annotations

import argparse
import os

DATASETS = ("ptb",)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="download the Penn Treebank or show where it is read from")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fetch = actions.add_parser("fetch", help="download a data set and verify its checksums")
    fetch.add_argument("dataset", choices=DATASETS, help="data set (ptb: the Penn Treebank, Mikolov's split)")
    fetch.add_argument("--dir", metavar="DIR", help="target directory (default: the per-user cache, which the "
                       "ptb task reads when no directory is given)")
    fetch.add_argument("--url", metavar="URL", help="base URL holding ptb.train.txt, ptb.valid.txt and ptb.test.txt "
                       "(default: $CELLSEARCH_PTB_URL, else the public copy)")
    fetch.add_argument("--timeout", type=float, default=60.0, metavar="S",
                       help="seconds without an answer before a download fails (default 60)")
    fetch.set_defaults(func=run_fetch)
    path = actions.add_parser("path", help="print the directory the task reads when none is given")
    path.add_argument("dataset", choices=DATASETS, help="data set")
    path.set_defaults(func=run_path)


def run_fetch(args: argparse.Namespace) -> int:
    from cellsearch.errors import UserError
    from cellsearch.tasks import ptb

    if not args.timeout > 0:
        raise UserError("--timeout must be positive")

    def report(name: str, what: str) -> None:
        print(f"{name}: {'already present' if what == 'present' else 'downloaded'}, checksum verified", flush=True)

    directory = ptb.fetch(args.dir, base_url=args.url, timeout=args.timeout, report=report)
    print(f"Penn Treebank in {directory.resolve()}")
    if args.dir:
        print(f"use it with --data-dir {directory.resolve()}, ptb_dir in a search config, "
              f"or {ptb.ENV_VAR}={directory.resolve()}")
    elif os.environ.get(ptb.ENV_VAR):
        print(f"note: {ptb.ENV_VAR} is set ({os.environ[ptb.ENV_VAR]}); the ptb task reads that directory, "
              f"not the cache, until it is unset")
    return 0


def run_path(args: argparse.Namespace) -> int:
    from cellsearch.tasks import ptb

    print(ptb.find_data_dir().resolve())
    return 0
