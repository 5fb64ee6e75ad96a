"""Jupyter helpers: a live preview step callback and snapshot grids.

The notebooks in ``notebooks/`` call these and the public API; they hold no logic of
their own.  Outside IPython, ``display`` prints a text representation instead.
"""

from __future__ import annotations

from PIL import Image

from .records.files import to_pil
from .run.snapshots import contact_sheet, row_labels


def batch_row(images) -> Image.Image:
    """[B, 3, H, W] in [0, 1] -> one image with the runs side by side."""
    pils = [to_pil(im) for im in images]
    w, h = pils[0].size
    row = Image.new("RGB", (w * len(pils), h), "white")
    for i, im in enumerate(pils):
        row.paste(im, (i * w, 0))
    return row


class LivePreview:
    """Step callback that shows the current images in a notebook and replaces them every
    ``every`` steps (and at the last step), with a line of step, loss and CLIP similarity."""

    def __init__(self, every: int = 10, scale: int = 2):
        self.every, self.scale = max(1, every), scale
        self.image_handle = self.text_handle = None
        self.updates = 0  # how many times the preview was drawn

    def __call__(self, state) -> None:
        if state.step % self.every and state.step != state.steps:
            return
        from IPython.display import display

        row = batch_row(state.image())
        row = row.resize((row.width * self.scale, row.height * self.scale), Image.NEAREST)
        text = (f"step {state.step}/{state.steps}  loss {state.loss.mean():.4f}  "
                f"CLIP similarity {state.similarity.mean():.4f}")
        if self.image_handle is None:
            self.image_handle = display(row, display_id=True)
            self.text_handle = display(text, display_id=True)
        else:
            self.image_handle.update(row)
            self.text_handle.update(text)
        self.updates += 1


def snapshot_grid(result) -> Image.Image:
    """A :class:`~clipguide.engine.loop.Result`'s snapshots (and final images) as a contact
    sheet: one row per run (labelled with its prompt and seed), one column per step."""
    images = {step: [to_pil(im) for im in batch] for step, batch in result.snapshots.items()}
    images.setdefault(result.steps_done, [to_pil(im) for im in result.images])
    return contact_sheet(images, rows=row_labels(result.runs))
