"""The models: decoders and CLIPs, their registries, loaders and weight files.

``decoders`` (registry and loader table), ``dalle`` / ``dalle_files`` (OpenAI's dVAE), ``vqgan``
(taming's VQGAN, without Lightning), ``clip`` (open_clip, ensembles, the shapes CLIP), ``weights``
(cache, download, sha256), ``safeload`` (restricted unpickling), ``loading`` (models per config,
loaded once per process).
"""
