"""Command line: ``clipguide generate | blend | resume | lineage | video | presets | models | train-shapes``
and the audits (``classify | audit-bias | score | calibrate-filter``).

Every user error is one line on stderr and exit code 2; Ctrl-C writes a final snapshot and exits
with 130, and so does a Ctrl-C while torch is still loading: the commands (:mod:`clipguide.commands`),
which import torch and the models, are imported inside :func:`main`, under its handler.
"""

from __future__ import annotations

import sys

from .errors import EXIT_INTERRUPTED, EXIT_USAGE, ClipguideError


def main(argv=None) -> int:
    try:  # the commands import torch (seconds): a Ctrl-C then is handled below too
        from .commands import COMMANDS, parse_command

        try:
            args = parse_command(argv)
        except SystemExit as e:  # usage errors (already printed, one line) and --help
            return e.code
        return COMMANDS[args.command](args)
    except ClipguideError as e:
        print(f"clipguide: error: {e}", file=sys.stderr)  # one line: ClipguideError escapes line breaks
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("clipguide: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
