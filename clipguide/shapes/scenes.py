"""Procedural "shapes world" scenes: one filled shape on a flat background.

Everything is deterministic from an explicit seed or ``numpy.random.Generator``;
the global numpy / torch RNGs are never used.

Public API
----------
COLOURS, SHAPES, BACKGROUNDS, TEMPLATES, CANONICAL_TEMPLATE, NEUTRAL_CAPTIONS
Scene, sample_scenes, render, to_tensor, caption, canonical_caption,
parse_caption, attributes_of_prompt, canonical_prompts, render_distractors, render_frame_cut, near_miss_draws,
NEAR_MISS_KINDS (only those near misses the pixel judge rejects: :func:`clipguide.shapes.judge.render_near_miss`),
DISTRACTOR_KINDS
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..errors import ConfigError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 225, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: tuple[str, ...] = COLOUR_NAMES
PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.uint8)  # [8, 3]

CANONICAL_TEMPLATE = "a {colour} {shape} on a {background} background"
TEMPLATES: tuple[str, ...] = (
    CANONICAL_TEMPLATE,
    "a {colour} {shape}",
    "a picture of a {colour} {shape} on {background}",
    "{colour} {shape}, {background} background",
    "a {shape} that is {colour}",
    "a {background} background with a {colour} {shape}",
)
#: Captions of images that are not a single clean shape (used for hard negatives).
NEUTRAL_CAPTIONS: tuple[str, ...] = (
    "random noise pattern",
    "a mosaic of colours",
    "several scattered shapes",
)

SIZE_RANGE = (0.3, 0.7)  # shape size as a fraction of the image side
MARGIN = 0.03  # the shape stays this far (fraction of side) from the border


@dataclass(frozen=True)
class Scene:
    """One filled ``shape`` of ``colour`` on a flat ``background``.

    Geometry is in fractions of the image side: centre (cx, cy) and ``size``
    (diameter of the circle, side of the square, base = height of the upright
    triangle whose apex points up).
    """

    colour: str
    shape: str
    background: str
    cx: float = 0.5
    cy: float = 0.5
    size: float = 0.5

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ConfigError(f"unknown colour {self.colour!r}: use one of {', '.join(COLOUR_NAMES)}")
        if self.background not in COLOURS:
            raise ConfigError(f"unknown background {self.background!r}: use one of {', '.join(COLOUR_NAMES)}")
        if self.shape not in SHAPES:
            raise ConfigError(f"unknown shape {self.shape!r}: use one of {', '.join(SHAPES)}")
        if self.colour == self.background:
            raise ConfigError(f"shape colour and background are both {self.colour!r}: pick two different colours")

    @property
    def attributes(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.background)


def _rng(seed_or_rng) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    if seed_or_rng is None:
        raise ConfigError("a seed or numpy Generator is required (global RNG is never used): pass seed=INT")
    return np.random.default_rng(seed_or_rng)


def sample_scenes(n: int, seed: int | np.random.Generator | None = 0, *, rng: np.random.Generator | None = None,
                  colour: str | None = None, shape: str | None = None, background: str | None = None) -> list[Scene]:
    """``n`` random scenes, deterministic from ``seed`` (or ``rng``). Attributes may be pinned."""
    g = rng if rng is not None else _rng(seed)
    out = []
    for _ in range(int(n)):
        c = colour or COLOUR_NAMES[int(g.integers(len(COLOUR_NAMES)))]
        s = shape or SHAPES[int(g.integers(len(SHAPES)))]
        if background is not None:
            b = background
        else:
            others = [x for x in BACKGROUNDS if x != c]
            b = others[int(g.integers(len(others)))]
        size = float(g.uniform(*SIZE_RANGE))
        lo, hi = size / 2 + MARGIN, 1 - size / 2 - MARGIN
        cx, cy = float(g.uniform(lo, hi)), float(g.uniform(lo, hi))
        out.append(Scene(c, s, b, round(cx, 5), round(cy, 5), round(size, 5)))
    return out


def shape_mask(shape: str, cx: float, cy: float, size: float, res: int) -> np.ndarray:
    """Boolean [res, res] mask of a shape (geometry in fractions of the side), pixel-centre sampled."""
    t = (np.arange(res, dtype=np.float64) + 0.5) / res
    return _shape_at(shape, t[None, :], t[:, None], cx, cy, size)


def _shape_at(shape: str, x, y, cx: float, cy: float, size: float) -> np.ndarray:
    """Whether the points (x, y) (broadcast arrays, fractions of the side) lie in the shape."""
    h = size / 2
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    if shape == "square":
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape == "triangle":
        top = cy - h
        return (y >= top) & (y <= cy + h) & (np.abs(x - cx) <= (y - top) / 2)
    raise ConfigError(f"unknown shape {shape!r}: use one of {', '.join(SHAPES)}")


def render(scenes: Scene | Sequence[Scene], size: int = 128) -> np.ndarray:
    """Render scenes to uint8 [N, size, size, 3] (hard edges, no anti-aliasing)."""
    if isinstance(scenes, Scene):
        scenes = [scenes]
    out = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for i, s in enumerate(scenes):
        out[i] = COLOURS[s.background]
        out[i][shape_mask(s.shape, s.cx, s.cy, s.size, size)] = COLOURS[s.colour]
    return out


def to_tensor(images: np.ndarray):
    """uint8 [N, H, W, 3] (or [H, W, 3]) -> float torch tensor [N, 3, H, W] in [0, 1]."""
    import torch

    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().div_(255.0)


def caption(scene: Scene, template: int | np.random.Generator = 0) -> str:
    """Caption of ``scene`` with template index ``template`` (or one drawn from a Generator)."""
    if isinstance(template, np.random.Generator):
        template = int(template.integers(len(TEMPLATES)))
    return TEMPLATES[int(template)].format(colour=scene.colour, shape=scene.shape, background=scene.background)


def canonical_caption(colour: str, shape: str, background: str) -> str:
    return CANONICAL_TEMPLATE.format(colour=colour, shape=shape, background=background)


def canonical_prompts() -> list[tuple[str, tuple[str, str, str]]]:
    """All (prompt, (colour, shape, background)) in the canonical template, colour != background (168)."""
    return [(canonical_caption(c, s, b), (c, s, b))
            for c in COLOUR_NAMES for s in SHAPES for b in BACKGROUNDS if b != c]


def vocabulary() -> frozenset[str]:
    """Every word of the captions the shapes CLIP was trained on (the templates with every colour and
    shape, and the neutral captions); a prompt's other words mean nothing to it."""
    words = " ".join((*TEMPLATES, *NEUTRAL_CAPTIONS, *COLOUR_NAMES, *SHAPES))
    return frozenset(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", words)))


def unknown_words(text: str) -> list[str]:
    """The words of ``text`` outside :func:`vocabulary`, in order (case and punctuation ignored)."""
    known = vocabulary()
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w not in known]


_CANON_RE = re.compile(r"^\s*an? (\w+) (\w+) on an? (\w+) background\s*\.?\s*$", re.IGNORECASE)


def parse_caption(text: str) -> tuple[str, str, str]:
    """Strictly parse a canonical caption ``a {colour} {shape} on a {background} background``."""
    m = _CANON_RE.match(text)
    if not m or m.group(1).lower() not in COLOURS or m.group(2).lower() not in SHAPES \
            or m.group(3).lower() not in COLOURS:
        raise ConfigError(f"prompt {text!r} is not in the canonical shapes template: "
                          f"write it as '{CANONICAL_TEMPLATE}' with colours from {', '.join(COLOUR_NAMES)} "
                          f"and shapes from {', '.join(SHAPES)}")
    return m.group(1).lower(), m.group(2).lower(), m.group(3).lower()


def attributes_of_prompt(text: str) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, background) asked for by a prompt; ``None`` for an attribute it does not name.

    Exact for the canonical template; best effort for the other templates
    (the colour is the colour word that is not followed by "background").
    Weights/stops after a ':' (e.g. "a red circle:1.5") are ignored.
    """
    try:
        return parse_caption(text.split(":")[0])
    except ConfigError:
        pass
    words = re.findall(r"[a-z]+", text.split(":")[0].lower())
    shape = next((w for w in words if w in SHAPES), None)
    background = colour = None
    for i, w in enumerate(words):
        if w in COLOURS:
            nxt = words[i + 1] if i + 1 < len(words) else ""
            prev = words[i - 1] if i > 0 else ""
            if nxt == "background" or (prev == "on" and nxt != (shape or "")):
                background = background or w
            elif colour is None:
                colour = w
    return colour, shape, background


# ----------------------------------------------------------------------------- distractors
DISTRACTOR_KINDS: tuple[str, ...] = ("mosaic", "noise", "multiblob", "texture", "speckle", "irregular", "stripes")


def _random_palette_colours(g: np.random.Generator, k: int) -> np.ndarray:
    return PALETTE[g.choice(len(PALETTE), size=k, replace=False)]


def _upsample_nearest(small: np.ndarray, size: int) -> np.ndarray:
    h = small.shape[0]
    idx = (np.arange(size) * h) // size
    return small[idx][:, idx]


def render_distractor(kind: str, g: np.random.Generator, size: int = 128) -> np.ndarray:
    """One uint8 [size, size, 3] image that is NOT a single clean shape (a hard negative)."""
    if kind == "mosaic":  # grid of 2-4 palette colours
        k = int(g.integers(2, 11))
        cols = _random_palette_colours(g, int(g.integers(2, 5)))
        return _upsample_nearest(cols[g.integers(len(cols), size=(k, k))], size)
    if kind == "noise":  # random RGB (or palette) noise at a random resolution
        k = int(g.choice([4, 8, 16, 32, 64, size]))
        if g.random() < 0.5:
            small = g.integers(0, 256, size=(k, k, 3)).astype(np.uint8)
        else:
            small = _random_palette_colours(g, int(g.integers(2, 6)))[g.integers(0, 2, size=(k, k))]
        return _upsample_nearest(small, size)
    img = np.empty((size, size, 3), dtype=np.uint8)
    bg_i, fg_i, other_i = g.choice(len(PALETTE), size=3, replace=False)
    img[:] = PALETTE[bg_i]
    if kind == "multiblob":  # 2-5 shapes (same colour or mixed) of comparable sizes
        n = int(g.integers(2, 6))
        same = g.random() < 0.5
        base = g.uniform(0.15, 0.35)
        for _ in range(n):
            s = float(base * g.uniform(0.8, 1.2))
            cx, cy = g.uniform(s / 2, 1 - s / 2, size=2)
            col = PALETTE[fg_i] if same else PALETTE[g.choice([i for i in range(len(PALETTE)) if i != bg_i])]
            img[shape_mask(SHAPES[int(g.integers(3))], cx, cy, s, size)] = col
        return img
    if kind == "texture":  # a shape filled with a checker/stripe texture of two colours
        s = float(g.uniform(*SIZE_RANGE))
        cx, cy = g.uniform(s / 2 + MARGIN, 1 - s / 2 - MARGIN, size=2)
        m = shape_mask(SHAPES[int(g.integers(3))], cx, cy, s, size)
        p = int(g.integers(3, 13))
        yy, xx = np.mgrid[0:size, 0:size]
        tex = ((xx // p + yy // p) % 2 == 0) if g.random() < 0.5 else ((xx // p) % 2 == 0)
        img[m & tex] = PALETTE[fg_i]
        img[m & ~tex] = PALETTE[other_i]
        return img
    if kind == "speckle":  # the right colour scattered as many small dots
        n = int(g.integers(8, 60))
        for _ in range(n):
            s = float(g.uniform(0.02, 0.08))
            cx, cy = g.uniform(0, 1, size=2)
            img[shape_mask(SHAPES[int(g.integers(3))], cx, cy, s, size)] = PALETTE[fg_i]
        return img
    if kind == "irregular":  # one irregular blob: union of 3-5 clearly offset shapes
        n = int(g.integers(3, 6))
        cx0, cy0 = g.uniform(0.35, 0.65, size=2)
        for _ in range(n):
            s = float(g.uniform(0.12, 0.3))
            cx = float(np.clip(cx0 + g.uniform(-0.2, 0.2), s / 2, 1 - s / 2))
            cy = float(np.clip(cy0 + g.uniform(-0.2, 0.2), s / 2, 1 - s / 2))
            img[shape_mask(SHAPES[int(g.integers(3))], cx, cy, s, size)] = PALETTE[fg_i]
        return img
    if kind == "stripes":  # stripes / rings of two or three colours over the whole image
        p = int(g.integers(4, 24))
        yy, xx = np.mgrid[0:size, 0:size]
        mode = int(g.integers(3))
        v = xx if mode == 0 else (yy if mode == 1 else np.hypot(xx - size * g.random(), yy - size * g.random()))
        cols = np.stack([PALETTE[fg_i], PALETTE[bg_i], PALETTE[other_i]])[: int(g.integers(2, 4))]
        return cols[(v // p).astype(int) % len(cols)]
    raise ConfigError(f"unknown distractor kind {kind!r}: use one of {', '.join(DISTRACTOR_KINDS)}")


def render_frame_cut(n: int, seed: int | np.random.Generator | None = 0, size: int = 128) -> np.ndarray:
    """``n`` uint8 [n, size, size, 3] images of one shape that crosses an edge of the frame by 15-45 % of its
    size: not "a shape on a background" (hard negatives for a CLIP whose training crops cut shapes too)."""
    g = _rng(seed)
    out = np.empty((int(n), size, size, 3), np.uint8)
    for img in out:
        bg, fg = g.choice(len(PALETTE), 2, replace=False)
        s = g.uniform(*SIZE_RANGE)
        h, over = s / 2, g.uniform(0.15, 0.45) * s
        centre = [g.uniform(h + MARGIN, 1 - h - MARGIN) for _ in range(2)]
        axis, far = g.integers(2), g.integers(2)
        centre[axis] = 1 - h + over if far else h - over
        img[:] = PALETTE[bg]
        img[shape_mask(SHAPES[g.integers(len(SHAPES))], centre[0], centre[1], s, size)] = PALETTE[fg]
    return out


def render_distractors(n: int, seed: int | np.random.Generator | None = 0, size: int = 128,
                       kinds: Sequence[str] = DISTRACTOR_KINDS) -> np.ndarray:
    """``n`` hard-negative images (uint8 [n, size, size, 3]) cycling through ``kinds``."""
    g = _rng(seed)
    return np.stack([render_distractor(kinds[int(g.integers(len(kinds)))], g, size) for _ in range(int(n))]) \
        if n else np.zeros((0, size, size, 3), np.uint8)


# ----------------------------------------------------------------------------- near misses
NEAR_MISS_KINDS: tuple[str, ...] = ("wobble", "bumps", "bites", "stretch", "fragments")


def _near_miss_mask(kind: str, scene: Scene, g: np.random.Generator, size: int) -> np.ndarray:
    """The mask of ``scene``'s shape spoilt by ``kind``: a wavy outline, discs added to or bitten out of the
    outline, a stretched bounding box, or small pieces of the colour beside the shape."""
    t = (np.arange(size, dtype=np.float64) + 0.5) / size
    x, y = t[None, :], t[:, None]
    cx, cy, s = scene.cx, scene.cy, scene.size
    if kind == "wobble":  # the outline's radius modulated by harmonics 2 to 5
        theta, amp = np.arctan2(y - cy, x - cx), g.uniform(0.1, 0.22)
        w = g.random(4)
        rho = 1 + sum(amp * w[i] / w.sum() * np.cos((i + 2) * theta + g.uniform(0, 2 * np.pi)) for i in range(4))
        return _shape_at(scene.shape, cx + (x - cx) / rho, cy + (y - cy) / rho, cx, cy, s)
    if kind == "stretch":  # a bounding box of aspect 1.5-2 either way
        a = g.uniform(1.5, 2.0) ** (1 if g.random() < 0.5 else -1)
        return _shape_at(scene.shape, cx + (x - cx) / np.sqrt(a), cy + (y - cy) * np.sqrt(a), cx, cy, s)
    mask = _shape_at(scene.shape, x, y, cx, cy, s)
    if kind in ("bumps", "bites"):  # 1-3 discs centred on the outline
        edge = np.argwhere(mask & ~np.roll(mask, 1, 0) | mask & ~np.roll(mask, -1, 1))
        for _ in range(int(g.integers(1, 4))):
            py, px = (edge[g.integers(len(edge))] + 0.5) / size
            disc = (x - px) ** 2 + (y - py) ** 2 <= (g.uniform(0.13, 0.25) * s) ** 2
            mask = mask | disc if kind == "bumps" else mask & ~disc
        return mask
    if kind == "fragments":  # 1-3 small pieces of the colour apart from the shape
        for _ in range(int(g.integers(1, 4))):
            mask = mask | _shape_at(SHAPES[g.integers(len(SHAPES))], x, y, *g.uniform(0.08, 0.92, 2), g.uniform(0.06, 0.14))
        return mask
    raise ConfigError(f"unknown near-miss kind {kind!r}: use one of {', '.join(NEAR_MISS_KINDS)}")


def near_miss_draws(seed: int | np.random.Generator | None = 0, size: int = 128,
                    kinds: Sequence[str] = NEAR_MISS_KINDS) -> Iterator[tuple[np.ndarray, Scene]]:
    """An endless stream of (uint8 [size, size, 3] image, scene): a fresh scene whose shape is spoilt by one of
    ``kinds``, keeping the colours and the layout.  Some draws may still read as their scene:
    :func:`clipguide.shapes.judge.render_near_miss` keeps only those the pixel judge rejects."""
    bad = [k for k in kinds if k not in NEAR_MISS_KINDS]
    if bad or not kinds:
        what = f"unknown near-miss kind {bad[0]!r}" if bad else "no near-miss kinds given"
        raise ConfigError(f"{what}: use one or more of {', '.join(NEAR_MISS_KINDS)}")
    return _near_miss_stream(_rng(seed), size, tuple(kinds))


def _near_miss_stream(g: np.random.Generator, size: int, kinds: tuple[str, ...]) -> Iterator[tuple[np.ndarray, Scene]]:
    while True:
        scene = sample_scenes(1, rng=g)[0]
        img = np.empty((size, size, 3), np.uint8)
        img[:] = COLOURS[scene.background]
        img[_near_miss_mask(kinds[int(g.integers(len(kinds)))], scene, g, size)] = COLOURS[scene.colour]
        yield img, scene
