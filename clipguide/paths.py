"""Where the package keeps the files it ships: data tables and the shapes-world models."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = PACKAGE_DIR / "data"  # JSON tables: code blacklist, occupations, concepts, seed experiments
SHAPES_MODELS = PACKAGE_DIR / "shapes" / "models"  # the shipped shapes-world models (clipguide train-shapes)
