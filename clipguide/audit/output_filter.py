"""Filtering outputs after generation: concepts given as text, each with a threshold on the
cosine similarity between the image's and the concept's CLIP embeddings.

This is the design of the Stable Diffusion safety checker as Rando et al. (2022, "Red-Teaming
the Stable Diffusion Safety Filter", arXiv:2210.04610) reverse-engineered it — unsafe concepts
as text embeddings, a threshold each, the image flagged when any similarity passes its
threshold — but open: the concepts are readable text and every score is recorded.  The 2021
discussion of these tools concluded that unwanted outputs should be filtered after generation,
not prevented by starving the model of data; so generation is never blocked here.  A flagged
snapshot is saved blurred (or withheld: a grey placeholder), the manifest records the scores and
the decision, and the original is kept (under ``flagged/``) only when asked for.

Thresholds do not transfer between CLIP models: :func:`calibrate` picks one from the similarity
distributions of positive and negative images and reports its ROC.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from ..errors import ConfigError
from ..paths import DATA_DIR
from ..shapes import scenes as S
from .classification import image_features, pyplot, resolve_clip, save_figure
from .scores import scorer_info

DEFAULT_CONCEPTS = DATA_DIR / "unsafe_concepts.json"
ACTIONS = ("blur", "withhold")
BLUR_FRACTION = 0.1  # Gaussian blur radius as a fraction of the image side: shapes and faces become colour fields
PLACEHOLDER = (128, 128, 128)


@dataclass(frozen=True)
class FilterDecision:
    """The verdict on one image: every concept's similarity, and what was done."""

    scores: dict  # concept -> cosine similarity
    flagged: tuple  # concepts at or above their threshold
    action: str  # "pass", "blur" or "withhold"

    @property
    def is_flagged(self) -> bool:
        return bool(self.flagged)

    def to_dict(self) -> dict:
        return {"scores": {k: round(v, 6) for k, v in self.scores.items()}, "flagged": bool(self.flagged),
                "concepts": list(self.flagged), "action": self.action}


def parse_concepts(spec) -> tuple[dict, str | None]:
    """(concept -> threshold, the CLIP the thresholds are for or None) from a dict, a string
    ``"red:0.3,a blue square:0.25"`` or a JSON file (the format of ``unsafe_concepts.json``, or
    what ``clipguide calibrate-filter --out`` writes)."""
    if isinstance(spec, dict):
        return {str(k): float(v) for k, v in spec.items()}, None
    path = Path(str(spec)).expanduser()
    if str(spec).endswith(".json"):
        return _concept_file(path)
    concepts = {}
    for part in str(spec).split(","):
        text, sep, thr = part.strip().rpartition(":")
        if not sep or not text.strip():
            raise ConfigError(f"concept {part.strip()!r} has no threshold: write TEXT:THRESHOLD, e.g. 'red:0.3' "
                              "(clipguide calibrate-filter finds one)")
        concepts[text.strip()] = _threshold(thr, part.strip())
    return concepts, None


def _threshold(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"threshold {text!r} of concept {where!r} is not a number: e.g. 'red:0.3'") from None
    if not -1.0 <= value <= 1.0:
        raise ConfigError(f"threshold {value} of concept {where!r} is not a cosine similarity in [-1, 1]")
    return value


def _concept_file(path: Path) -> tuple[dict, str | None]:
    try:
        data = json.loads(path.read_text())
        concepts = {c["text"]: _threshold(str(c["threshold"]), c["text"]) for c in data["concepts"]}
    except FileNotFoundError:
        raise ConfigError(f"concept file {path} does not exist: check the path") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"concept file {path} is not a concept list ({e.__class__.__name__}: {e}): "
                          'it needs {"concepts": [{"text": ..., "threshold": ...}], "model": CLIP}') from None
    if not concepts:
        raise ConfigError(f"concept file {path} lists no concepts: add at least one")
    return concepts, data.get("model")


class OutputFilter:
    """Flag images whose CLIP similarity to any concept reaches its threshold.

    ``concepts``: None (the default unsafe list, ``data/unsafe_concepts.json``, whose thresholds are
    set for one CLIP only), a dict ``{text: threshold}``, a string ``"text:thr,..."`` or a JSON file.
    ``action``: ``blur`` or ``withhold``; ``keep_flagged`` keeps the unblurred original.
    """

    def __init__(self, clip, concepts=None, action: str = "blur", keep_flagged: bool = False, device: str = "auto"):
        if action not in ACTIONS:
            raise ConfigError(f"--filter-action {action!r} is not one of {', '.join(ACTIONS)}")
        self.clip = resolve_clip(clip, device)
        table, model = parse_concepts(DEFAULT_CONCEPTS if concepts is None else concepts)
        if model is not None and model != self.clip.name:
            source = "the default unsafe-concept list" if concepts is None else f"the concept file {concepts}"
            raise ConfigError(f"the thresholds of {source} were set for CLIP {model}, not {self.clip.name}; thresholds "
                              "do not transfer between CLIPs: pass --filter-clip " + model +
                              " or calibrate your own (clipguide calibrate-filter) and pass --filter-concepts")
        self.concepts, self.model = table, model
        self.action, self.keep_flagged = action, keep_flagged
        self.source = "default" if concepts is None else ("file" if str(concepts).endswith(".json") else "given")
        self._texts = list(table)
        self._thresholds = torch.tensor([table[t] for t in self._texts])
        self._embeddings = F.normalize(self.clip.encode_text(self._texts), dim=-1).cpu()  # [C, D]

    def scores(self, images) -> torch.Tensor:
        """Cosine similarity [N, C] of each image with each concept (order of ``concepts``)."""
        return image_features(self.clip, images) @ self._embeddings.T

    def check(self, images) -> list[FilterDecision]:
        decisions = []
        for row in self.scores(images):
            hit = tuple(t for t, s, thr in zip(self._texts, row.tolist(), self._thresholds.tolist()) if s >= thr)
            decisions.append(FilterDecision(dict(zip(self._texts, row.tolist())), hit, self.action if hit else "pass"))
        return decisions

    def apply(self, image: Image.Image, decision: FilterDecision) -> Image.Image:
        """The image to release: unchanged, blurred, or a grey 'withheld' placeholder."""
        if decision.action == "blur":
            return blur(image)
        if decision.action == "withhold":
            return placeholder(image.size)
        return image

    def describe(self) -> dict:
        return {"clip": scorer_info(self.clip),
                "concepts": self.concepts, "thresholds_for": self.model, "source": self.source,
                "action": self.action, "keep_flagged": self.keep_flagged, "rule": "flagged if cosine >= threshold"}


def blur(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=max(2.0, BLUR_FRACTION * max(image.size))))


def placeholder(size) -> Image.Image:
    im = Image.new("RGB", size, PLACEHOLDER)
    ImageDraw.Draw(im).text((4, 4), "withheld", fill="white")
    return im


def from_flags(filter_on: bool, concepts, action: str, keep_flagged: bool, clip_spec: str, device: str = "auto"):
    """The OutputFilter the run flags ask for (``--filter``, ``--filter-concepts``, ...), or None."""
    if not filter_on and concepts is None:
        if keep_flagged or action != "blur":
            raise ConfigError("--keep-flagged and --filter-action need a filter: add --filter or --filter-concepts")
        return None
    return OutputFilter(clip_spec, concepts, action=action, keep_flagged=keep_flagged, device=device)


# ----------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """A concept's threshold chosen from the similarities of positive and negative images."""

    concept: str
    clip: str
    threshold: float
    tpr: float  # positives flagged, at the threshold
    fpr: float  # negatives flagged, at the threshold
    method: str  # "equal-error" or "fpr<=X"
    positives: list = field(repr=False, default_factory=list)  # similarities
    negatives: list = field(repr=False, default_factory=list)
    held_out: dict | None = None  # {"tpr", "fpr", "positives", "negatives"} on fresh images

    def roc(self, points: int = 11) -> list[tuple[float, float, float]]:
        """(threshold, TPR, FPR) at ``points`` thresholds spanning the observed similarities."""
        lo, hi = min(self.positives + self.negatives), max(self.positives + self.negatives)
        grid = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
        return [(t, *rates(self.positives, self.negatives, t)) for t in grid]

    def concept_file(self) -> dict:
        """What ``--filter-concepts FILE.json`` reads."""
        return {"model": self.clip, "concepts": [{"text": self.concept, "threshold": round(self.threshold, 4),
                                                  "tpr": self.tpr, "fpr": self.fpr, "method": self.method,
                                                  "held_out": self.held_out}]}

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [f"concept {self.concept!r}, CLIP {self.clip}: threshold {self.threshold:.4f} ({self.method}) -> "
                 f"TPR {self.tpr:.3f}, FPR {self.fpr:.3f} on {len(self.positives)} positives / {len(self.negatives)} negatives"]
        if self.held_out:
            h = self.held_out
            lines.append(f"held-out: TPR {h['tpr']:.3f}, FPR {h['fpr']:.3f} on {h['positives']} / {h['negatives']} fresh images")
        lines.append("ROC: threshold   TPR    FPR")
        lines += [f"     {t:9.4f} {tp:6.3f} {fp:6.3f}" for t, tp, fp in self.roc()]
        return "\n".join(lines)

    def plot(self, path) -> Path:
        """Histogram of the two similarity distributions with the threshold, and the ROC curve."""
        plt = pyplot()
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.hist(self.negatives, bins=30, alpha=0.6, label=f"negatives ({len(self.negatives)})")
        ax1.hist(self.positives, bins=30, alpha=0.6, label=f"positives ({len(self.positives)})")
        ax1.axvline(self.threshold, color="black", linestyle="--", label=f"threshold {self.threshold:.3f}")
        ax1.set(xlabel=f"cosine similarity to {self.concept!r}", ylabel="images", title=self.clip)
        ax1.legend()
        roc = self.roc(101)
        ax2.plot([r[2] for r in roc], [r[1] for r in roc])
        ax2.plot([self.fpr], [self.tpr], "ko")
        ax2.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
        record = {"figure": "filter calibration", "concept": self.concept, "clip": self.clip,
                  "threshold": self.threshold, "tpr": self.tpr, "fpr": self.fpr}
        return save_figure(fig, path, record)


def rates(positives, negatives, threshold: float) -> tuple[float, float]:
    """(TPR, FPR) of the rule "flagged if similarity >= threshold"."""
    tpr = sum(s >= threshold for s in positives) / max(1, len(positives))
    fpr = sum(s >= threshold for s in negatives) / max(1, len(negatives))
    return tpr, fpr


def choose_threshold(positives, negatives, target_fpr: float | None = None) -> tuple[float, str]:
    """A threshold midway between adjacent observed similarities: the equal-error point (the least
    max(FPR, 1 - TPR); among ties the largest TPR - FPR), or with ``target_fpr`` the lowest one
    whose FPR stays within it (the most recall)."""
    scores = sorted(set(positives) | set(negatives))
    candidates = [scores[0] - 1e-6] + [(a + b) / 2 for a, b in zip(scores, scores[1:])] + [scores[-1] + 1e-6]
    table = [(t, *rates(positives, negatives, t)) for t in candidates]
    if target_fpr is None:
        t, _, _ = min(table, key=lambda r: (max(r[2], 1 - r[1]), r[2] - r[1]))
        return t, "equal-error"
    allowed = [r for r in table if r[2] <= target_fpr]
    return min(allowed, key=lambda r: r[0])[0], f"fpr<={target_fpr:g}"


def calibrate(clip, concept: str, positives, negatives, target_fpr: float | None = None,
              held_out: tuple | None = None, device: str = "auto") -> Calibration:
    """Choose a threshold for ``concept`` from images that show it (``positives``) and that do
    not (``negatives``); ``held_out=(positives, negatives)`` measures it on fresh images."""
    flt = OutputFilter(resolve_clip(clip, device), {concept: 0.0})
    pos, neg = flt.scores(positives)[:, 0].tolist(), flt.scores(negatives)[:, 0].tolist()
    if not pos or not neg:
        raise ConfigError("calibration needs both positive and negative images")
    threshold, method = choose_threshold(pos, neg, target_fpr)
    tpr, fpr = rates(pos, neg, threshold)
    report = None
    if held_out is not None:
        hp, hn = flt.scores(held_out[0])[:, 0].tolist(), flt.scores(held_out[1])[:, 0].tolist()
        htpr, hfpr = rates(hp, hn, threshold)
        report = {"tpr": htpr, "fpr": hfpr, "positives": len(hp), "negatives": len(hn)}
    return Calibration(concept, flt.clip.name, threshold, tpr, fpr, method, pos, neg, report)


def shapes_sets(concept: str, n: int = 200, seed: int = 0, size: int = 128):
    """Rendered shapes-world scenes for a concept that names shapes-world attributes ("red",
    "a red circle", "green square"): (positives showing all of them, negatives showing not all),
    ``n`` each, uint8 [n, size, size, 3] → float tensors."""

    colour, shape, background = S.attributes_of_prompt(concept)
    if not (colour or shape or background):
        raise ConfigError(f"concept {concept!r} names no shapes-world colour or shape ({', '.join(S.COLOUR_NAMES)}; "
                          f"{', '.join(S.SHAPES)}): give --positives and --negatives folders instead")
    pos = S.sample_scenes(n, seed, colour=colour, shape=shape, background=background)
    pool = S.sample_scenes(max(4 * n, 64), seed + 1)
    neg = [s for s in pool if not (s.colour == (colour or s.colour) and s.shape == (shape or s.shape)
                                   and s.background == (background or s.background))][:n]
    return S.to_tensor(S.render(pos, size)), S.to_tensor(S.render(neg, size))
