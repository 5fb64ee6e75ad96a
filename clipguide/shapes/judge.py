"""A pixel judge for shapes-world images (no neural network).

``judge(image)`` reads (colour, shape, background) from one image:

* every pixel is snapped to the nearest palette colour (pixels far from every
  palette colour are "unknown");
* background = the colour of most of the border (it must cover >= 60 % of it);
* colour = the commonest non-background colour, which must make up most of the
  foreground;
* shape: the pixels of that colour must form ONE coherent, solid blob — the
  largest 8-connected component holds >= 90 % of them, other non-background
  colours are a small fraction of it, it has (almost) no holes — and its mask,
  compared with an ideal circle / square / upright triangle fitted to its
  bounding box, must reach IoU >= ``SHAPE_IOU``; it must not touch the frame.  Textures, mosaics, speckles,
  several blobs and irregular blobs therefore get ``shape=None``.  Decoders draw a triangle with rounded
  corners, which shrinks its bounding box; the triangle is therefore also fitted to the box grown back by
  the amount a corner radius up to ``ROUNDING`` of the side removes, and the best IoU counts.

An attribute that cannot be read is ``None``.

``render_near_miss`` draws hard negatives for the scenes: near misses of a scene that the judge rejects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .scenes import COLOUR_NAMES, NEAR_MISS_KINDS, PALETTE, Scene, near_miss_draws

COLOUR_TOL = 90.0  # max RGB distance to the nearest palette colour
BORDER = 2  # border width (pixels) used for the background
BORDER_MIN = 0.6  # background must cover this fraction of the border
MIN_AREA = 0.01  # min blob area (fraction of the image)
COLOUR_MIN = 0.6  # the shape colour must be this fraction of the foreground
LARGEST_MIN = 0.9  # the largest component must hold this fraction of the colour's pixels
OTHER_MAX = 0.2  # other non-background colours, relative to the blob area
HOLES_MAX = 0.05  # hole pixels, relative to the filled blob
SHAPE_IOU = 0.85  # IoU with the ideal fitted shape
ROUNDING = 0.15  # a triangle's corners may be rounded up to this radius (fraction of its side): decoders round them
MAX_SIDE = 128  # larger images are downsampled (nearest) before judging


@dataclass(frozen=True)
class Verdict:
    colour: str | None
    shape: str | None
    background: str | None
    shape_iou: float = 0.0  # IoU of the blob with the best ideal shape (diagnostic)
    reason: str = ""  # why an attribute is None: "category: detail" of the first check that failed (diagnostic)

    @property
    def attributes(self) -> tuple[str | None, str | None, str | None]:
        return (self.colour, self.shape, self.background)

    def matches(self, colour=None, shape=None, background=None) -> dict[str, bool]:
        """Per-attribute match against a target; attributes given as None are not checked (True)."""
        return {"colour": colour is None or self.colour == colour,
                "shape": shape is None or self.shape == shape,
                "background": background is None or self.background == background}

    def all_match(self, colour=None, shape=None, background=None) -> bool:
        return all(self.matches(colour, shape, background).values())


def _to_hwc_uint8(image) -> np.ndarray:
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"expected a float tensor [3, H, W] in [0, 1], got shape {tuple(t.shape)}")
        return (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0, 1) * 255 + 0.5).astype(np.uint8) if a.max() <= 1.0 \
            else np.clip(a, 0, 255).astype(np.uint8)
    return a


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels (0 = not in mask; labels are arbitrary positive ints)."""
    h, w = mask.shape
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    p = np.zeros((h + 2, w + 2), dtype=lab.dtype)
    while True:
        p[1:-1, 1:-1] = lab
        m = lab.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.maximum(m, p[dy:dy + h, dx:dx + w], out=m)
        m = np.where(mask, m, 0)
        # pointer jumping: follow the label one hop (labels are flat pixel indices + 1)
        jumped = np.where(mask, m.reshape(-1)[np.maximum(m, 1).reshape(-1) - 1].reshape(h, w), 0)
        m = np.maximum(m, jumped)
        if np.array_equal(m, lab):
            return lab
        lab = m


def _reach_from_border(free: np.ndarray) -> np.ndarray:
    """Pixels of ``free`` 4/8-connected to the image border through ``free``."""
    lab = _components(free)
    border_labels = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    border_labels = border_labels[border_labels > 0]
    return np.isin(lab, border_labels)


def _ideal_masks(y0, y1, x0, x1, h, w) -> dict[str, np.ndarray]:
    """Ideal circle / square masks fitted to a bounding box, in a (h, w) canvas (triangles: _triangle_iou)."""
    bh, bw = y1 - y0, x1 - x0
    t_y = (np.arange(h) + 0.5)[:, None]
    t_x = (np.arange(w) + 0.5)[None, :]
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    ry, rx = bh / 2, bw / 2
    circle = ((t_x - cx) / rx) ** 2 + ((t_y - cy) / ry) ** 2 <= 1
    square = (t_y >= y0) & (t_y <= y1) & (t_x >= x0) & (t_x <= x1)
    return {"circle": circle, "square": square}


def _triangle(y0, y1, x0, x1, t_y, t_x) -> np.ndarray:
    """The upright triangle with apex at the top centre of a bounding box and base along its bottom."""
    cx, frac = (x0 + x1) / 2, (t_y - y0) / (y1 - y0)
    return (t_y >= y0) & (t_y <= y1) & (np.abs(t_x - cx) <= frac * (x1 - x0) / 2)


def _triangle_iou(blob: np.ndarray, y0, y1, x0, x1) -> float:
    """Best IoU of ``blob`` with the triangle fitted to its bounding box, or with a sharp triangle whose
    corners it may have rounded (radius r up to ROUNDING of its side; ROUNDING = 0: the plain fit). Rounding a corner of radius r pulls the bounding box in by r(1/sin(a/2) - 1)
    at the apex (1.236 r for base = height) and by r(1/tan(b/2) - 1) at each base corner (0.618 r),
    so the sharp triangle is fitted to the box grown back by those amounts."""
    h, w = blob.shape
    t_y, t_x = (np.arange(h) + 0.5)[:, None], (np.arange(w) + 0.5)[None, :]
    best = 0.0
    for r in range(int(ROUNDING * max(y1 - y0, x1 - x0)) + 1):
        tri = _triangle(y0 - 1.236 * r, y1, x0 - 0.618 * r, x1 + 0.618 * r, t_y, t_x)
        best = max(best, np.logical_and(tri, blob).sum() / max(1, np.logical_or(tri, blob).sum()))
    return float(best)


def judge(image) -> Verdict:
    """Read (colour, shape, background) from one image (uint8 HWC array, PIL image or float CHW tensor)."""
    a = _to_hwc_uint8(image)
    h, w = a.shape[:2]
    if max(h, w) > MAX_SIDE:
        step = int(np.ceil(max(h, w) / MAX_SIDE))
        a = a[step // 2::step, step // 2::step]
        h, w = a.shape[:2]
    d = ((a[:, :, None, :].astype(np.float32) - PALETTE[None, None].astype(np.float32)) ** 2).sum(-1)
    lab = d.argmin(-1)
    lab[np.sqrt(d.min(-1)) > COLOUR_TOL] = -1

    b = min(BORDER, h // 4, w // 4) or 1
    border = np.concatenate([lab[:b].ravel(), lab[-b:].ravel(), lab[:, :b].ravel(), lab[:, -b:].ravel()])
    counts = np.bincount(border[border >= 0], minlength=len(PALETTE))
    bg = int(counts.argmax())
    if counts[bg] < BORDER_MIN * border.size:
        return Verdict(None, None, None, reason="background: no colour covers most of the border")
    background = COLOUR_NAMES[bg]

    fg = (lab >= 0) & (lab != bg)
    n_fg = int(fg.sum())
    if n_fg < MIN_AREA * h * w:
        return Verdict(None, None, background, reason="foreground: none")
    fg_counts = np.bincount(lab[fg], minlength=len(PALETTE))
    col = int(fg_counts.argmax())
    if fg_counts[col] < COLOUR_MIN * n_fg:
        return Verdict(None, None, background, reason="colour: no colour makes up most of the foreground")
    colour = COLOUR_NAMES[col]

    cmask = lab == col
    comps = _components(cmask)
    ids, sizes = np.unique(comps[comps > 0], return_counts=True)
    big = ids[sizes.argmax()]
    blob = comps == big
    area = int(sizes.max())
    if area < LARGEST_MIN * fg_counts[col] or area < MIN_AREA * h * w:
        return Verdict(colour, None, background, reason="pieces: the colour is not one blob")
    if n_fg - fg_counts[col] > OTHER_MAX * area:
        return Verdict(colour, None, background, reason="other colours: too much of them beside the blob")
    filled = ~_reach_from_border(~blob)
    if int(filled.sum()) - area > HOLES_MAX * filled.sum():
        return Verdict(colour, None, background, reason="holes: in the blob")
    ys, xs = np.nonzero(filled)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    if y0 == 0 or x0 == 0 or y1 == h or x1 == w:  # a shape cut by the frame is not "a shape on a background"
        return Verdict(colour, None, background, reason="frame: the blob touches it")
    ious = {name: np.logical_and(ideal, filled).sum() / max(1, np.logical_or(ideal, filled).sum())
            for name, ideal in _ideal_masks(y0, y1, x0, x1, h, w).items()}
    ious["triangle"] = _triangle_iou(filled, y0, y1, x0, x1)
    best = max(ious, key=ious.get)  # the first of equals, in circle, square, triangle order
    best_iou = float(ious[best])
    # aspect ratio: rendered shapes have square bounding boxes
    aspect = (y1 - y0) / max(1, (x1 - x0))
    if best_iou < SHAPE_IOU:
        return Verdict(colour, None, background, best_iou, f"outline: IoU {best_iou:.2f} with the best fitted {best}")
    if not 0.75 <= aspect <= 1.33:
        return Verdict(colour, None, background, best_iou, f"aspect: the bounding box is {aspect:.2f}, not square")
    return Verdict(colour, best, background, best_iou)


def judge_batch(images: Iterable) -> list[Verdict]:
    """judge() each image of a uint8 [N, H, W, 3] array, a float [N, 3, H, W] tensor or a list of images."""
    return [judge(im) for im in images]


def accuracy(verdicts: Sequence[Verdict], targets: Sequence[Sequence[str | None]]) -> dict[str, float]:
    """Per-attribute and all-three accuracy of verdicts against (colour, shape, background) targets.

    A target attribute of None is not checked (counts as right).
    """
    n = max(1, len(verdicts))
    acc = {"colour": 0, "shape": 0, "background": 0, "all": 0}
    for v, t in zip(verdicts, targets):
        m = v.matches(*t)
        for k in ("colour", "shape", "background"):
            acc[k] += m[k]
        acc["all"] += all(m.values())
    return {k: v / n for k, v in acc.items()}


def render_near_miss(n: int, seed: int | np.random.Generator | None = 0, size: int = 128,
                     kinds: Sequence[str] = NEAR_MISS_KINDS) -> tuple[np.ndarray, list[Scene]]:
    """``n`` scenes whose shape is spoilt by one of ``kinds`` (uint8 [n, size, size, 3]) and the scenes they
    spoil: hard negatives that keep the colours and the layout and miss only the shape
    (:func:`~clipguide.shapes.scenes.near_miss_draws`). A draw that the pixel judge still reads as its scene
    is drawn again, so none of them is a genuine match."""
    draws = near_miss_draws(seed, size, kinds)
    out, scenes = np.empty((int(n), size, size, 3), np.uint8), []
    for img in out:
        img[:], scene = next((im, sc) for im, sc in draws if not judge(im).all_match(*sc.attributes))
        scenes.append(scene)
    return out, scenes
