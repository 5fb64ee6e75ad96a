"""The prompt language: prompt strings -> weighted text, image and noise targets.

Grammar (one prompt string = one run)::

    prompt  := phrase ('^' phrase)*               story phrases (nerdyrodent's story mode)
    phrase  := group ('|' group)*                 parallel targets, summed (Crowson)
    group   := element                            Crowson: [kind:]value[:weight[:stop]]
             | part ('::' [weight] part)*         a Midjourney multi-prompt (contains '::')
    kind    := 'text' | 'image' | 'noise'         explicit kind, e.g. image:cat.png, noise:42

* **Elements** (Crowson's ``parse_prompt``): up to two numeric fields are peeled off
  the right: ``weight`` (default 1) and ``stop`` (default -inf, never stop pulling).
  A field that does not start like a number (``//host/a.png``, ``\\pics\\a.png``, ``sunset``)
  stays part of the value, so URLs and Windows paths survive; a field that does
  (``1x``, ``0.5.3``, ``1,5``, ``nan``) is an error.
* **Kinds**: ``text:``, ``image:`` or ``noise:`` directly followed by the value
  (no space) names the kind.  Without one, an ``http(s)://`` URL, or a value without
  whitespace ending in an image suffix (.png, .jpg, ...), is an image prompt;
  anything else is text.  ``noise:SEED`` is a seeded N(0, 1) embedding.
* **Midjourney multi-prompts** (``polar bear::0.6, white::-0.5``): the number right
  after ``::`` weighs the part before it (default 1); commas around parts are
  dropped.  Weights are relative: they are divided by their **signed sum**, which
  must be positive, so a group's weights always sum to 1 (``a::2 b::2`` is
  ``a:0.5 | b:0.5``; ``a::0.6 b::-0.5`` is ``a:6 | b:-5``).  Parts have no stop.
* **Story** (nerdyrodent): ``^`` separates phrases; with ``story_every = N``, phrase
  ``i`` is active for steps ``[i·N, (i+1)·N)``, cycling.  The schedule depends only
  on the step, so step k of a long run is still the end of a k-step run.

:func:`parse_prompt` returns a :class:`Prompt`; ``canonical(p)`` (also ``str(p)``)
writes it back so that ``parse_prompt(canonical(p)) == p``.  Every mistake is a
:class:`PromptError` whose one-line message quotes and marks the offending part.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..records.images import (
    load_image,
    locate,
    pil_to_tensor,
    resize_to_area,
    sha256_of,
)
from .cutouts import make_cutouts

KINDS = ("text", "image", "noise")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RESERVED = ("|", "^", "::")
MAX_SEED = 2**63 - 1

_KIND_PREFIX = re.compile(r"(text|image|noise):(?=\S)")
# A field the user meant as a number: starts like one and has no path separator or space.
# nan counts as a number so that it is refused (weight nan, stop nan), not kept as text.
_NUMBER_LIKE = re.compile(r"[+-]?(\.?\d[^\s/\\]*|inf|infinity|nan)", re.IGNORECASE)
# Midjourney: the weight right after '::' ends at whitespace, a comma or the end;
# inf, infinity and nan standing alone there are weights too (and refused as not finite).
_MJ_WEIGHT = re.compile(r"\s*([+-]?(?:\.?\d[^\s,]*|(?:inf|infinity|nan)(?=[\s,]|$)))", re.IGNORECASE)
_URL = re.compile(r"https?://\S+", re.IGNORECASE)
ELEMENT_HINT = ("weights and stops are plain numbers, e.g. 'blue:-0.5:-1.2' "
                "(if it is part of the text, end the element with ':1:-inf')")
MIDJOURNEY_HINT = "a Midjourney weight is a plain number right after '::', e.g. 'white::-0.5'"


class PromptError(ConfigError):
    """A prompt that cannot be parsed or encoded; ``str(e)`` is one line marking the culprit.

    ``prompt`` and the character span ``[start, end)`` of the offending part are kept
    for callers that want to draw a caret (:attr:`caret`)."""

    def __init__(self, message: str, prompt: str | None = None, start: int = 0, end: int | None = None):
        self.problem, self.prompt = message, prompt
        self.start, self.end = start, len(prompt or "") if end is None else max(end, start)
        super().__init__(message if prompt is None else f"{message} -- in prompt {self.marked()}")

    def marked(self, context: int = 40) -> str:
        """The prompt with the culprit between »«, clipped to ``context`` characters each side."""
        p, a, b = self.prompt, self.start, self.end
        left = ("…" if a > context else "") + p[max(0, a - context) : a]
        right = p[b : b + context] + ("…" if len(p) - b > context else "")
        return repr(f"{left}»{p[a:b]}«{right}")

    @property
    def caret(self) -> str:
        """Two lines: the prompt and a caret under the culprit (for notebooks and logs)."""
        return f"{self.prompt}\n{' ' * self.start}{'^' * max(1, self.end - self.start)}"


@dataclass(frozen=True)
class Target:
    """One weighted target: CLIP is pulled toward it (weight > 0) or pushed away (< 0)."""

    kind: str  # "text" | "image" | "noise"
    value: str  # the text, an image path or URL, or the noise seed (decimal)
    weight: float = 1.0
    stop: float = -math.inf  # the gradient stops where the distance, signed by the weight, is below this (Crowson)

    def __str__(self) -> str:
        return canonical_target(self)

    def __repr__(self) -> str:
        return f"Target({self.kind!r}, {self.value!r}, {self.weight!r}, {self.stop!r})"


@dataclass(frozen=True)
class Prompt:
    """A parsed prompt: story phrases, each a tuple of targets (one phrase without '^')."""

    phrases: tuple[tuple[Target, ...], ...]

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(t for phrase in self.phrases for t in phrase)

    def phrase_at(self, step: int, every: int) -> tuple[Target, ...]:
        return self.phrases[phrase_index(step, every, len(self.phrases))]

    def __str__(self) -> str:
        return canonical(self)


def phrase_index(step: int, every: int, count: int) -> int:
    """nerdyrodent's story mode: phrase i is active for steps [i·every, (i+1)·every), cycling."""
    return (step // every) % count if every > 0 else 0


# ----------------------------------------------------------------------------- parsing


def parse_prompt(text: str) -> Prompt:
    """Parse a prompt string (grammar in the module docstring); raises :class:`PromptError`."""
    if not isinstance(text, str):  # a number, bytes, a list...: named, not an AttributeError from deep inside
        shown = " ".join(repr(text).split())
        shown = shown if len(shown) <= 60 else shown[:59] + "…"
        raise PromptError(f"a prompt is text, got {type(text).__name__}: {shown} "
                          "(pass a string, e.g. \"a red circle on a blue background\")")
    if not text.strip():
        raise PromptError("empty prompt: give some text, e.g. \"a red circle on a blue background\"")
    phrases = tuple(_phrase(piece, start, text) for piece, start in _split(text, 0, "^"))
    return Prompt(phrases)


def check_prompt(text: str, story_every: int) -> Prompt:
    """Parse a run's prompt and check its story phrases have a schedule."""
    prompt = parse_prompt(text)
    if len(prompt.phrases) > 1 and story_every <= 0:
        i = text.index("^")
        raise PromptError(f"{len(prompt.phrases)} story phrases ('^') but no schedule: set --story-every N (steps per phrase)",
                          text, i, i + 1)
    return prompt


def parse_targets(text: str) -> list[Target]:
    """The targets of a prompt without story phrases."""
    prompt = parse_prompt(text)
    if len(prompt.phrases) > 1:
        raise PromptError("story phrases ('^') are not allowed here: give one phrase", text, text.index("^"), text.index("^") + 1)
    return list(prompt.phrases[0])


def _split(text: str, start: int, sep: str) -> list[tuple[str, int]]:
    """``text.split(sep)`` with each piece's offset in the whole prompt."""
    out, i = [], start
    for piece in text.split(sep):
        out.append((piece, i))
        i += len(piece) + len(sep)
    return out


def _span(piece: str, start: int) -> tuple[int, int]:
    """Span of ``piece`` without its surrounding whitespace."""
    lead = len(piece) - len(piece.lstrip())
    return start + lead, start + lead + len(piece.strip())


def _phrase(piece: str, start: int, prompt: str) -> tuple[Target, ...]:
    """One story phrase: its '|' groups, each a Crowson element or a Midjourney multi-prompt."""
    targets: list[Target] = []
    for group, g_start in _split(piece, start, "|"):
        parse = _midjourney if "::" in group else _element
        targets += parse(group, g_start, prompt)
    if sum(abs(t.weight) for t in targets) == 0:
        raise PromptError("the weights of this phrase add up to zero: give some target a non-zero weight",
                          prompt, *_span(piece, start))
    return tuple(targets)


def _element(piece: str, start: int, prompt: str) -> list[Target]:
    """Crowson's ``[kind:]value[:weight[:stop]]``: numeric fields peeled off the right, at most two."""
    a, b = _span(piece, start)
    if a == b:
        raise PromptError("empty prompt element: remove the extra '|' or '^', or write text there", prompt, a, b)
    kind, body, body_start = _kind_prefix(prompt[a:b], a)
    fields: list[tuple[float, int, int]] = []  # (number, start, end), left to right
    while len(fields) < 2 and ":" in body:
        left, field = body.rsplit(":", 1)
        f_start = body_start + len(left) + 1
        if not field.strip():
            raise PromptError("nothing after ':': give a number (weight or stop) or remove the ':'", prompt, f_start - 1, f_start)
        if not _NUMBER_LIKE.fullmatch(field.strip()):
            break  # part of the value: a URL, a Windows path, "Note: ..."
        fields.insert(0, (_number(field, prompt, f_start, ELEMENT_HINT), *_span(field, f_start)))
        body = left
    weight = _finite(*fields[0], prompt) if fields else 1.0
    stop = _stop(*fields[1], prompt) if len(fields) == 2 else -math.inf
    return [_target(kind, body, body_start, prompt, weight, stop)]


def _target(kind: str | None, body: str, start: int, prompt: str, weight: float, stop: float = -math.inf) -> Target:
    value = body.strip()
    return Target(_kind_of(kind, value), _value(kind, value, prompt, *_span(body, start)), weight, stop)


def _finite(weight: float, a: int, b: int, prompt: str) -> float:
    if not math.isfinite(weight):
        raise PromptError(f"weight {weight} is not finite: give a finite number", prompt, a, b)
    return weight


def _stop(stop: float, a: int, b: int, prompt: str) -> float:
    """A stop as Crowson's Prompt takes it: a number, or -inf (never stop); nan is none, and +inf would
    stop the gradient everywhere while making the loss infinite."""
    if math.isnan(stop) or stop == math.inf:
        raise PromptError(f"stop {stop} is not usable: give a number, e.g. -1.2, or -inf (never stop)", prompt, a, b)
    return stop


def _kind_prefix(text: str, start: int) -> tuple[str | None, str, int]:
    m = _KIND_PREFIX.match(text)
    if m is None:
        return None, text, start
    return m.group(1), text[m.end() :], start + m.end()


def _kind_of(explicit: str | None, value: str) -> str:
    if explicit is not None:
        return explicit
    return "image" if looks_like_image(value) else "text"


def looks_like_image(value: str) -> bool:
    """An ``http(s)://`` URL, or a path without whitespace ending in an image suffix."""
    if _URL.fullmatch(value):
        return True
    return value.lower().endswith(IMAGE_SUFFIXES) and not any(c.isspace() for c in value)


def _number(field: str, prompt: str, start: int, hint: str) -> float:
    try:
        return float(field)
    except ValueError:
        a, b = _span(field, start)
        raise PromptError(f"{field.strip()!r} is not a number: {hint}", prompt, a, b) from None


def _value(kind: str | None, value: str, prompt: str, a: int, b: int) -> str:
    """Check a value (non-empty, writable back) and normalise a noise seed."""
    if not value:
        raise PromptError("this element has a weight but no text, image or seed before it", prompt, a, b)
    if value.startswith(":") or value.endswith(":"):
        raise PromptError(f"value {value!r} starts or ends with ':': remove the stray ':'", prompt, a, b)
    if kind == "noise":
        if not re.fullmatch(r"[0-9]{1,19}", value) or int(value) > MAX_SEED:
            raise PromptError(f"noise seed {value!r} is not an integer in 0..2**63-1: "
                              "write noise:SEED[:weight], e.g. noise:42:0.5", prompt, a, b)
        return str(int(value))
    return value


def _midjourney(piece: str, start: int, prompt: str) -> list[Target]:
    """A Midjourney multi-prompt ``a::w b::w``: weights relative, divided by their signed sum."""
    segments = _split(piece, start, "::")
    parts: list[tuple[tuple[int, int], float]] = []  # (span of the part's text, weight)
    text, t_start = segments[0]
    for seg, s_start in segments[1:]:
        weight, rest, r_start = _mj_weight(seg, s_start, prompt)
        parts.append((_mj_part(text, t_start, prompt), weight))
        text, t_start = rest, r_start
    if _mj_strip(text):
        parts.append((_mj_part(text, t_start, prompt), 1.0))
    total = sum(w for _, w in parts)
    if not total > 0:
        raise PromptError(f"Midjourney weights sum to {total:g}: they must sum to a positive number (each is divided by the sum)",
                          prompt, *_span(piece, start))
    # Rounded to 12 digits so that 0.6/0.1 reads back as 6, not 6.000000000000001.
    return [_mj_target(prompt, a, b, float(f"{w / total:.12g}")) for (a, b), w in parts]


def _mj_weight(seg: str, start: int, prompt: str) -> tuple[float, str, int]:
    """The weight right after '::' (default 1) and the rest of the segment."""
    m = _MJ_WEIGHT.match(seg)
    if m is None:
        return 1.0, seg, start
    a, b = start + m.start(1), start + m.end(1)
    return _finite(_number(m.group(1), prompt, a, MIDJOURNEY_HINT), a, b, prompt), seg[m.end() :], start + m.end()


def _mj_strip(text: str) -> str:
    return text.strip().strip(",").strip()


def _mj_part(text: str, start: int, prompt: str) -> tuple[int, int]:
    """Span of a part's text without surrounding whitespace and commas."""
    value = _mj_strip(text)
    if not value:
        a, _ = _span(text, start)
        raise PromptError("a Midjourney part is empty: write text before each '::weight'", prompt, a, a + 2)
    a = start + text.find(value)  # only whitespace and commas precede it
    return a, a + len(value)


def _mj_target(prompt: str, a: int, b: int, weight: float) -> Target:
    kind, body, body_start = _kind_prefix(prompt[a:b], a)
    return _target(kind, body, body_start, prompt, weight)


# ----------------------------------------------------------------------------- writing


def canonical_target(t: Target) -> str:
    """``[kind:]value:weight[:stop]``, written so that parsing it gives ``t`` back
    (the kind is written for images and noise, and for text that would read as another kind)."""
    body = f"{t.value}:{_fmt(t.weight)}"
    # Write the stop when the value has a ':' too, so exactly two fields are peeled back off.
    body += f":{_fmt(t.stop)}" if math.isfinite(t.stop) or ":" in t.value else ""
    for out in ([body] if t.kind == "text" else []) + [f"{t.kind}:{body}"]:
        if not any(r in t.value for r in RESERVED) and _parses_back(out) == t:
            return out
    raise PromptError(f"target {t!r} cannot be written as a prompt: values are non-empty, unpadded, hold none of "
                      f"{' '.join(RESERVED)}, do not start or end with ':'; kinds are {', '.join(KINDS)}; weights finite")


def _parses_back(element: str) -> Target | None:
    try:
        return _element(element, 0, element)[0]
    except PromptError:
        return None


def canonical(prompt: Prompt | Sequence[Target]) -> str:
    """The canonical string of a prompt (or of one phrase's targets)."""
    phrases = prompt.phrases if isinstance(prompt, Prompt) else (tuple(prompt),)
    return " ^ ".join(" | ".join(canonical_target(t) for t in phrase) for phrase in phrases)


def blend_prompt(images: Sequence[str], texts: Sequence[str] = ()) -> str:
    """``clipguide blend``'s prompt: each IMAGE[:weight[:stop]] an image target (even without
    an image suffix), then the text targets."""
    parts = [s.strip() if _KIND_PREFIX.match(s.strip()) else f"image:{s.strip()}" for s in images]
    return " | ".join(parts + [t.strip() for t in texts])


def _fmt(x: float) -> str:
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


# ----------------------------------------------------------------------------- encoding


@dataclass(eq=False)
class Targets:
    """Encoded targets of a batch, padded to common counts of story phrases P and rows T.

    A text or noise target is one row; an image target is ``cutn`` rows (its cutouts)
    of weight ``w / cutn`` each, so the losses' sum over rows of ``|w_t|·mean_i`` is
    Crowson's ``|w|·mean`` over all (cutout, image-cutout) pairs.  Padding rows weigh 0.
    """

    embeds: torch.Tensor  # [B, P, T, D]
    weights: torch.Tensor  # [B, P, T]
    stops: torch.Tensor  # [B, P, T]
    phrases: torch.Tensor  # [B] story phrases of each run (long)
    every: int = 0  # steps per story phrase (0: first phrase only)

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeds [B, T, D], weights [B, T], stops [B, T]) of the phrases active at ``step``."""
        idx = torch.tensor([phrase_index(step, self.every, int(n)) for n in self.phrases])
        rows = torch.arange(len(idx))
        return self.embeds[rows, idx], self.weights[rows, idx], self.stops[rows, idx]

    def to(self, device) -> "Targets":
        return Targets(self.embeds.to(device), self.weights.to(device), self.stops.to(device), self.phrases, self.every)


def encode_targets(clip, prompts: Sequence[str], cfg=None, seeds: Sequence[int] | None = None) -> Targets:
    """Encode each run's prompt: text through CLIP (each distinct text once), images
    through ``cfg``'s cutouts (seeded per run), noise from its seed."""
    parsed = [parse_prompt(p) for p in prompts]
    seeds = list(seeds) if seeds is not None else [0] * len(parsed)
    texts = sorted({t.value for p in parsed for t in p.targets if t.kind == "text"})
    table = dict(zip(texts, clip.encode_text(texts).float().cpu())) if texts else {}
    rows = [[_phrase_rows(clip, phrase, table, cfg, seed, text) for phrase in p.phrases]
            for p, seed, text in zip(parsed, seeds, prompts)]
    return _pad(rows, clip.embed_dim, cfg.story_every if cfg is not None else 0)


def _phrase_rows(clip, phrase, table, cfg, seed: int, prompt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One phrase as (embeds [T, D], weights [T], stops [T])."""
    embeds, weights, stops = [], [], []
    for t in phrase:
        if t.kind == "text":
            e = table[t.value][None]
        elif t.kind == "noise":
            e = noise_embedding(int(t.value), clip.embed_dim)
        else:
            e = image_embeddings(clip, t.value, cfg, seed, prompt)
        embeds.append(e)
        weights.append(torch.full((len(e),), t.weight / len(e)))
        stops.append(torch.full((len(e),), t.stop))
    return torch.cat(embeds), torch.cat(weights), torch.cat(stops)


def _pad(rows, dim: int, every: int) -> Targets:
    b, p = len(rows), max(len(r) for r in rows)
    t = max(len(w) for r in rows for _, w, _ in r)
    embeds, weights = torch.zeros(b, p, t, dim), torch.zeros(b, p, t)
    stops = torch.full((b, p, t), -math.inf)
    for i, run in enumerate(rows):
        for j, (e, w, s) in enumerate(run):
            embeds[i, j, : len(w)], weights[i, j, : len(w)], stops[i, j, : len(w)] = e, w, s
    return Targets(embeds, weights, stops, torch.tensor([len(r) for r in rows]), every)


def noise_embedding(seed: int, dim: int) -> torch.Tensor:
    """Crowson's noise prompt: a seeded N(0, 1) embedding [1, D]."""
    return torch.randn(1, dim, generator=torch.Generator().manual_seed(seed))


def image_prompt_seed(run_seed: int) -> int:
    """Seed of a run's image-prompt cutouts: derived from, but independent of, the run's stream."""
    return int(np.random.SeedSequence([run_seed, 0x1A6E]).generate_state(1)[0])


def image_embeddings(clip, source: str, cfg, seed: int, prompt: str = "") -> torch.Tensor:
    """Crowson's image prompt: the image resized to about the output's area (aspect kept),
    cut by the run's own cutout recipe, encoded: [cutn, D]."""

    if cfg is None:
        raise PromptError(f"image prompt {source!r} needs the run's config (cutouts, size): pass cfg to encode_targets")
    with pointing_at(prompt, source):
        image = load_image(source, what="image prompt")
    x = pil_to_tensor(resize_to_area(image, *cfg.dims())).to(clip.device)
    g = torch.Generator().manual_seed(image_prompt_seed(seed))
    with torch.no_grad():
        return clip.encode_image(make_cutouts(x, cfg, clip.image_size, [g])).float().cpu()


@contextlib.contextmanager
def pointing_at(prompt: str, part: str):
    """Re-raise a ConfigError about ``part`` of ``prompt`` (an unreadable image) as a PromptError marking it."""
    try:
        yield
    except PromptError:
        raise
    except ConfigError as e:
        if not prompt:
            raise
        a = max(prompt.find(part), 0)
        raise PromptError(str(e), prompt or None, a, a + len(part)) from None


def run_parents(prompt: str, init_image: str = "") -> list[dict]:
    """The images a run starts from or is pulled toward, for its manifest's lineage:
    ``{"role": "init_image" | "image_prompt", "source", "file", "sha256"}`` each."""

    roles = [("init_image", init_image)] if init_image else []
    roles += [("image_prompt", t.value) for t in parse_prompt(prompt).targets if t.kind == "image"]
    out = []
    for role, source in dict.fromkeys(roles):  # an image used twice is one parent
        with pointing_at(prompt if role == "image_prompt" else "", source):
            digest = sha256_of(source, what="--init-image" if role == "init_image" else "image prompt")
        out.append({"role": role, "source": source, "file": locate(source), "sha256": digest})
    return out
