"""What the pinned-bytes tests (test_pinned.py, test_shapes_training_pins.py) share: the CPU their hashes hold on.

A run is bit for bit the same for one seed and thread count on one kind of machine, but CPUs of different vendors
take different float kernels (MKL and oneDNN dispatch otherwise on AMD and Intel), so the same code gives other
last bits there.  The pins are therefore tables per CPU vendor.  On a CPU with no table every pinned run and its
resume check still run; only the comparison with recorded hashes is skipped, naming how to record them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clipguide.records.manifest import cpu_vendor  # also what a run's manifest records

RECORD = bool(os.environ.get("CLIPGUIDE_PIN_RECORD"))
CPU = cpu_vendor()


def pins_for(tables: dict, test_file: str):
    """This CPU's pins in ``tables`` (vendor -> pins); where none were recorded, skip the caller's comparison."""
    if CPU not in tables:
        pytest.skip(f"no pinned bytes recorded on {CPU} CPUs (only on {', '.join(tables)}): record them with "
                    f"CLIPGUIDE_PIN_RECORD=1 python -m pytest tests/{Path(test_file).name} -s")
    return tables[CPU]
