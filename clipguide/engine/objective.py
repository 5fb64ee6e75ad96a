"""What the loop minimises: objectives handed to :func:`~clipguide.engine.loop.optimise`.

An objective maps one step's rendered images to a per-run loss, in the spirit of k-diffusion's
``cond_fn`` closures: the loop renders the latent, asks the objective for an :class:`Evaluation`
and runs one backward pass through what it returns, so a new loss never edits the loop.

* :class:`PromptObjective`: the CLIP-guided loss of the 2021 notebooks (docs/methods.md §1): random
  cutouts of the image, embedded by CLIP, pulled toward the prompt's targets.
* :class:`PixelObjective`: mean squared error to target images (fitting renders, no CLIP).
* extra terms, ``term(view) -> [B]``: :class:`TotalVariation`, :class:`LatentPenalty`; any callable
  of a :class:`View` composes with a main objective through :class:`Objective`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from .cutouts import make_cutouts
from .latents import Latent
from .losses import LOSSES, prompt_similarity
from .ops import tv_loss


@dataclass(frozen=True, eq=False)
class View:
    """What an objective sees at one step."""

    image: torch.Tensor  # [B, 3, H, W] in [0, 1], in the autograd graph of the latent
    latent: Latent
    step: int
    generators: list  # one torch.Generator per run: all randomness of the step comes from them
    codes: torch.Tensor | None = None  # [B, V, h, w] the relaxed code weights the image was decoded from


@dataclass(eq=False)
class Evaluation:
    """A step's per-run loss and how to back-propagate it: ``torch.autograd.backward(roots, grads)``.

    A term that already took part of its gradient (the chunked CLIP backward) returns a detached
    ``loss`` and, as root, the image-side tensor with that gradient; a plain term returns its
    loss's sum as root with no gradient (None)."""

    loss: torch.Tensor  # [B]
    similarity: torch.Tensor | None = None  # [B] CLIP cosine to the prompt's positive targets, if any
    roots: list = field(default_factory=list)
    grads: list = field(default_factory=list)


class Guide(Protocol):
    """A main objective: ``evaluate(view, backward)``; with ``backward`` the returned roots and grads
    are what the loop back-propagates (nothing is back-propagated into the latent yet)."""

    def evaluate(self, view: View, backward: bool) -> Evaluation: ...


Term = Callable[[View], torch.Tensor]  # an extra per-run loss [B], differentiable in the image or latent


class Objective:
    """A guide plus extra terms: their losses add; the terms' gradients are back-propagated with the
    guide's, in the same backward pass."""

    def __init__(self, guide: Guide, terms: Sequence[Term] = ()):
        self.guide, self.terms = guide, list(terms)

    def __call__(self, view: View, backward: bool) -> Evaluation:
        ev = self.guide.evaluate(view, backward)
        extra = [term(view) for term in self.terms]
        roots, grads = list(ev.roots), list(ev.grads)
        root = sum(t.sum() for t in extra) if backward and extra else None
        if root is not None and root.requires_grad:  # (a term may be a constant of the latent)
            roots.append(root)
            grads.append(None)
        loss = sum(extra, ev.loss)  # with backward the terms' gradients go through the roots: report the value only
        return Evaluation(loss.detach() if backward else loss, ev.similarity, roots, grads)


class PromptObjective:
    """CLIP guidance toward a batch's prompt targets (:class:`~clipguide.engine.prompts.Targets`):
    ``cfg.cutn`` cutouts per run, ``cfg.loss`` between their embeddings and the targets, × ``loss_scale``.

    With ``backward``, CLIP runs ``cfg.cut_batch`` cutouts at a time: the loss is a mean over
    cutouts, so the chunks' losses and gradients add up to the whole's while only one chunk's
    activations are alive; the cutouts' summed gradient goes back through the decoder once."""

    def __init__(self, cfg, clip, targets):
        self.cfg, self.clip, self.targets = cfg, clip, targets.to(cfg.device)  # the story phrase depends on the step
        self.loss_fn = LOSSES[cfg.loss]

    def evaluate(self, view: View, backward: bool) -> Evaluation:
        cfg, gens = self.cfg, view.generators
        embeds, weights, stops = self.targets.at(view.step)
        cuts = make_cutouts(view.image, cfg, self.clip.image_size, gens)
        if not backward:
            emb = self.clip.encode_image(cuts).view(len(gens), cfg.cutn, -1)
            loss = cfg.loss_scale * self.loss_fn(emb, embeds, weights, stops)
            return Evaluation(loss, prompt_similarity(emb, embeds, weights))
        loss, emb, grad = 0, [], []
        for part in cuts.view(len(gens), cfg.cutn, *cuts.shape[1:]).split(cfg.cut_batch or cfg.cutn, dim=1):
            leaf = part.detach().requires_grad_()
            e = self.clip.encode_image(leaf.flatten(0, 1)).view(len(gens), part.shape[1], -1)
            part_loss = cfg.loss_scale * self.loss_fn(e, embeds, weights, stops) * (part.shape[1] / cfg.cutn)
            part_loss.sum().backward()  # runs are independent: each gets its own gradient
            loss, grad = loss + part_loss.detach(), grad + [leaf.grad]
            emb.append(e.detach())
        emb = torch.cat(emb, 1)
        return Evaluation(loss, prompt_similarity(emb, embeds, weights), [cuts], [torch.cat(grad, 1).view_as(cuts)])


class PixelObjective:
    """Mean squared error to ``target`` images [B, 3, H, W]: the search space pulled toward known
    pictures, without CLIP (how well a latent and schedule can draw a scene at all)."""

    def __init__(self, target: torch.Tensor):
        self.target = target

    def evaluate(self, view: View, backward: bool) -> Evaluation:
        loss = (view.image - self.target).pow(2).flatten(1).mean(1)
        return Evaluation(loss.detach() if backward else loss, None, [loss.sum()] if backward else [], [None] if backward else [])


class TotalVariation:
    """``weight``/4 · total variation of the image (a smoothness prior; off in every notebook recipe)."""

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, view: View) -> torch.Tensor:
        return self.weight / 4 * tv_loss(view.image)


class PriorTerm:
    """``weight`` x the token prior's negative log-likelihood of the step's relaxed codes, in nats per
    code: CLIP refines the image while the prior keeps its codes on the decoder's manifold."""

    def __init__(self, prior, weight: float):
        self.prior, self.weight = prior, weight

    def __call__(self, view: View) -> torch.Tensor:
        codes = view.codes.float()
        return -self.weight * self.prior.log_prob(codes) / codes[0, 0].numel()


def latent_penalty(view: View) -> torch.Tensor:
    """The latent's own regulariser (Crowson's pull toward the initial latent, docs/methods.md §4; nerdyrodent's
    decaying pull toward zero, §6, which depends on the step)."""
    return view.latent.penalty(view.step)


def cfg_terms(cfg, prior=None) -> list[Term]:
    """The extra terms a config asks for, in the order their losses are added."""
    terms: list[Term] = [TotalVariation(cfg.tv_weight)] if cfg.tv_weight else []
    terms += [latent_penalty] if cfg.init_weight else []
    return terms + ([PriorTerm(prior, cfg.prior_weight)] if cfg.prior_weight else [])


def prompt_objective(cfg, clip, targets, prior=None) -> Objective:
    """The objective of a config: CLIP guidance toward ``targets`` plus the config's extra terms."""
    return Objective(PromptObjective(cfg, clip, targets), cfg_terms(cfg, prior))
