"""Sweeps: many runs (prompts x seeds x presets x any config field) from one spec, on this machine or
a Ray cluster, resumable point by point.

* :mod:`.spec` reads a sweep spec and expands it into points (one run each);
* :mod:`.groups` batches points that may share one :func:`~clipguide.engine.loop.optimise` call;
* :mod:`.ledger` is the sweep's ``sweep.json``: the spec, the points and each point's state;
* :mod:`.worker` runs one group into its run folder through :func:`~clipguide.run.session.run_session`
  (or continues it from its checkpoint), wherever it executes;
* :mod:`.executors` runs the groups here (``local``) or as Ray tasks (``ray``);
* :mod:`.results` writes ``results.csv`` and the contact sheet;
* :mod:`.driver` is :func:`sweep`, which ties them together.
"""
