"""``python -m clipguide.shapes.train``: the command line of :mod:`clipguide.shapes.training`.

Kept as a module of its own because the shipped json files and MODEL_CARD.md record their training commands
in this form.
"""

from .training import main

if __name__ == "__main__":
    raise SystemExit(main())
