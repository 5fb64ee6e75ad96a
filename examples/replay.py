"""Re-run a recorded clipguide run and check that it reproduces its images bit for bit.

  python examples/replay.py --manifest runs/RUN/manifest.json [--out DIR] [--threads N]

The run is rebuilt from the manifest (config, seeds, preset) and re-run with the recorded
thread count; every recorded snapshot is compared pixel for pixel. The report names what
differs from the record: clipguide/torch/python versions, thread count, device, model
sha256, changed input images, and each snapshot's largest pixel difference.

Exit status: 0 every snapshot reproduced bit for bit, 1 some differ, 2 the manifest cannot
be read or replayed.
"""

import argparse
import sys
from pathlib import Path

from clipguide import ClipguideError, replay


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.json of the run (or its folder)")
    parser.add_argument("--out", type=Path, default=None, help="keep the replayed run here [a temporary folder]")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [the recorded count]")
    parser.add_argument("--device", default=None, help="torch device [the recorded one]")
    args = parser.parse_args(argv)
    try:
        report = replay(args.manifest, out_dir=args.out, threads=args.threads, device=args.device)
    except ClipguideError as e:
        print(f"replay: error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.identical else 1


if __name__ == "__main__":
    sys.exit(main())
