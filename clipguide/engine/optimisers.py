"""The optimisers a run can name: every usable ``torch.optim`` optimiser, and DiffGrad and AdamP from
the optional ``torch-optimizer`` package (nerdyrodent's list), each with its own options.

``RunConfig.optimiser`` is a key of :data:`OPTIMISER_CLASSES` (lower case); ``RunConfig.optimiser_options``
holds the keyword arguments of its constructor as ``key=value`` pairs (``momentum=0.9,betas=[0.5,0.99]``)
or a JSON object, checked against the constructor's signature.  The learning rate is always ``--lr``
and the weight decay ``--weight-decay`` (for the optimisers that take one), so neither is an option;
the exception is ``adam``, which keeps the first Aleph2Image's Adam without weight decay: it refuses
``--weight-decay`` (which it used to ignore) and takes an L2 decay as the option ``weight_decay``.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError

if TYPE_CHECKING:  # the config imports the engine's tables of names
    from ..config import RunConfig

EXTRA = "optimizers"  # setup.cfg's extra that installs torch-optimizer


@dataclass(frozen=True)
class OptimiserEntry:
    """A nameable optimiser: ``load()`` gives its class (importing an optional package only when named);
    ``decay``: the class receives ``--weight-decay`` (when its signature has a weight_decay)."""

    load: Callable[[], type]
    decay: bool = True

    def __call__(self, params, cfg: RunConfig) -> torch.optim.Optimizer:
        cls, options = self.load(), parse_options(cfg.optimiser_options)
        if self.decay and "weight_decay" in signature_options(cls):
            options["weight_decay"] = cfg.weight_decay
        return cls(params, lr=cfg.lr, **options)


def _from_extra(module: str, name: str) -> Callable[[], type]:
    def load() -> type:
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError:
            raise ConfigError(f"--optimiser {name.lower()} comes from torch-optimizer, which is not installed: "
                              f"pip install 'clipguide[{EXTRA}]' (or pip install torch-optimizer)") from None

    return load


# torch.optim's optimisers that one plain step() of a dense 4-D latent cannot drive, and why
UNSUPPORTED = {
    "lbfgs": "its step() needs a closure that re-evaluates the loss",
    "sparseadam": "it takes only sparse gradients",
    "muon": "it takes only 2-D parameters",
}

_TORCH = {name.lower(): cls for name, cls in vars(torch.optim).items()
          if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
          and name.lower() not in UNSUPPORTED}

OPTIMISER_CLASSES = {  # RunConfig.optimiser -> (params, cfg) -> optimiser
    "adam": OptimiserEntry(lambda: torch.optim.Adam, decay=False),  # Aleph2Image: no weight decay
    "adamw": OptimiserEntry(lambda: torch.optim.AdamW),  # Crowson
    **{name: OptimiserEntry(lambda cls=cls: cls) for name, cls in sorted(_TORCH.items()) if name not in ("adam", "adamw")},
    "diffgrad": OptimiserEntry(_from_extra("torch_optimizer", "DiffGrad")),  # nerdyrodent
    "adamp": OptimiserEntry(_from_extra("torch_optimizer", "AdamP")),  # nerdyrodent
}


def make_optimiser(cfg: RunConfig, params) -> torch.optim.Optimizer:
    return OPTIMISER_CLASSES[cfg.optimiser](params, cfg)


def signature_options(cls: type) -> list[str]:
    """The keyword arguments of an optimiser's constructor, less ``params``."""
    params = inspect.signature(cls.__init__).parameters
    return [n for n, p in params.items() if n not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def parse_options(text: str) -> dict:
    """``key=value,key=value`` (a value is JSON: 0.9, true, [0.9,0.99], or else a plain word) or a JSON
    object -> a dict; JSON lists become tuples (torch's betas)."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            options = json.loads(text)
        except ValueError:
            options = None
        if not isinstance(options, dict):
            raise ConfigError(f"--optimiser-options {text!r:.80} is not a JSON object: write key=value,key=value")
    else:
        options = dict(_pair(part, text) for part in _split(text))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def _split(text: str) -> list[str]:
    """``text`` cut at the commas outside brackets (a list value keeps its commas)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in [*parts, text[start:]] if p.strip()]


def _pair(part: str, text: str) -> tuple[str, object]:
    key, eq, value = part.partition("=")
    if not eq or not key.strip() or not value.strip():
        raise ConfigError(f"--optimiser-options {text!r:.80}: {part!r} is not key=value (e.g. momentum=0.9,betas=[0.5,0.99])")
    value = value.strip().replace("(", "[").replace(")", "]")
    word = {"True": "true", "False": "false", "None": "null"}.get(value, value)
    try:
        return key.strip(), json.loads(word)
    except ValueError:
        return key.strip(), value  # a plain word, e.g. a mode's name


def canonical_options(text: str) -> str:
    """The options in one spelling, sorted ``key=value`` with JSON values, so that two spellings of the
    same options are the same config (manifests, resume)."""
    options = parse_options(text)
    return ",".join(f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v, separators=(',', ':'))}"
                    for k, v in sorted(options.items()))


def check_optimiser(name: str, options_text: str, weight_decay: float) -> None:
    """Raise a one-line ConfigError for an optimiser name this cannot run, an option its constructor
    does not take (naming those it takes) or a value it refuses; loads an optional class only when named."""
    if not isinstance(options_text, str):
        raise ConfigError(f"--optimiser-options is {options_text!r:.60}: expected key=value pairs or a JSON object")
    if name in UNSUPPORTED:
        raise ConfigError(f"--optimiser {name} is not supported: {UNSUPPORTED[name]}; pick another, e.g. adam or rmsprop")
    entry = OPTIMISER_CLASSES.get(name)
    if entry is None:
        return  # the config's choices name it
    cls, options = entry.load(), parse_options(options_text)
    accepted = signature_options(cls)
    takes_decay = entry.decay and "weight_decay" in accepted
    own = {"lr": "--lr", **({"weight_decay": "--weight-decay"} if takes_decay else {})}
    valid = [k for k in accepted if k not in own]
    for key in options:
        if key in own:
            raise ConfigError(f"--optimiser-options {key}: set it with {own[key]}, not as an option")
        if key not in accepted:
            raise ConfigError(f"--optimiser-options {key} is not an option of {cls.__name__}; "
                              f"its options: {', '.join(valid) or 'none'}")
    if weight_decay and not entry.decay:  # silently ignored before: say what the user may have meant
        raise ConfigError(f"--weight-decay {weight_decay}: --optimiser {name} is Aleph2Image's Adam without decay; use "
                          f"--optimiser adamw for decoupled decay, or --optimiser-options weight_decay={weight_decay} for L2")
    if weight_decay and not takes_decay:
        raise ConfigError(f"--weight-decay {weight_decay}: {cls.__name__} takes no weight decay; drop --weight-decay")
    try:  # the constructor checks the values (ranges, types) on a stand-in parameter
        cls([torch.zeros(2, 2, requires_grad=True)], lr=1e-3, **options)
    except (ValueError, TypeError, RuntimeError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"--optimiser-options {canonical_options(options_text)!r}: {cls.__name__} refuses them "
                          f"({message:.160})") from None
