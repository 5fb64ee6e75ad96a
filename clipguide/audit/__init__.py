"""Audits of generated images: zero-shot ``classification``, the ``output_filter``, ``scores``
(CLIP score, CLIP Fréchet distance) and ``bias`` audits.
"""
