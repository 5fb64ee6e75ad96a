"""Runs on disk: the one run function and the callbacks that write a run folder.

``session`` (:func:`run_session`, used by every caller), ``snapshots`` and ``checkpoints`` (the
folder's callbacks), ``generation`` (:func:`generate`), ``resume``, ``replay``, ``experiments``.
"""
