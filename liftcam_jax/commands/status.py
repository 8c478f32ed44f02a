"""status: what a run folder holds: done, failed and pending inputs, merged over every host's log.

Works for explain and evaluate folders, while a run goes on or after it
stopped; lists the failed inputs with their errors. Exit status 0 when
nothing failed or is pending, 1 otherwise.
"""
from __future__ import annotations

import sys


def add_arguments(parser):
    parser.add_argument("out", metavar="OUT", help="an output folder of liftcam-jax explain or evaluate")
    parser.add_argument("--show", type=int, default=20, help="failed inputs to list (default 20)")


def run(args, zoo) -> int:
    from ..runs.folder import status

    st = status(args.out)
    print(f"{args.out}: {st['command']} run, logs: {', '.join(st['logs']) or 'none'}")
    print(f"{st['done']} done, {st['failed']} failed (of the inputs the logs name)")
    for i, (ident, error) in enumerate(st["failed_ids"].items()):
        if i >= args.show:
            print(f"... and {st['failed'] - args.show} more failed")
            break
        print(f"failed: {ident}: {error}")
    sys.stdout.flush()
    return 1 if st["failed"] else 0
