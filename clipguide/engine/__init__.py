"""The engine: the optimisation loop and what it is made of.

``loop`` (:func:`optimise`) drives a latent (``latents``) through a renderer (``render``: the decoder,
output noise, clamp) into an objective (``objective``: CLIP over random ``cutouts`` with the ``losses``
toward the prompt's targets from ``prompts``, plus extra terms).  ``interfaces`` declares what the
engine needs from decoders and CLIPs; ``state`` holds what a step hands out and a checkpoint takes
back.  The engine imports no model, preset or file format.
"""
