"""Records: what a run leaves on disk and how it is read back, checked.

``files`` (atomic writes, PNG text chunks), ``manifest`` (``manifest.json``), ``checkpoints``
(the checkpoint file format), ``images`` (user-given images, safely), ``lineage`` (the images a
run grew from).
"""
