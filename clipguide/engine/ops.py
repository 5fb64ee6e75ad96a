"""Small differentiable operations shared by the recipes (docs/methods.md §1)."""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F


class _ReplaceGrad(torch.autograd.Function):
    """Forward ``x_forward``; send the whole gradient to ``x_backward`` (straight-through)."""

    @staticmethod
    def forward(x_forward, x_backward):
        return x_forward

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.backward_shape = inputs[1].shape  # the gradient is summed to it (broadcast inputs)

    @staticmethod
    def backward(ctx, grad):
        return None, grad.sum_to_size(ctx.backward_shape)


def replace_grad(x_forward: torch.Tensor, x_backward: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: value of ``x_forward``, gradient of ``x_backward``."""
    return _ReplaceGrad.apply(x_forward, x_backward)


class _ClampWithGrad(torch.autograd.Function):
    """Crowson's ClampWithGrad: pass the gradient inside the range, and outside it only where a
    descent step moves x back toward the range."""

    @staticmethod
    def forward(x, lo, hi):
        return x.clamp(lo, hi)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.bounds = inputs[0], inputs[1:]
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        keep = grad * (x - x.clamp(*ctx.bounds)) >= 0
        return grad * keep, None, None


def clamp_with_grad(x: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Clamp to [lo, hi] without killing the gradient that would bring x back into range."""
    return _ClampWithGrad.apply(x, lo, hi)


def _sinc(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x != 0, torch.sin(math.pi * x) / (math.pi * x), torch.ones_like(x))


@functools.lru_cache(maxsize=512)
def _lanczos_kernel(src: int, dst: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Lanczos-2 low-pass kernel for downscaling ``src`` -> ``dst`` samples, normalised to sum 1."""
    ratio = dst / src
    half = math.ceil(2 / ratio) - 1  # taps strictly inside the kernel's width of 2
    x = torch.arange(-half, half + 1, dtype=torch.float64) * ratio
    k = torch.where(x.abs() < 2, _sinc(x) * _sinc(x / 2), torch.zeros_like(x))
    return (k / k.sum()).to(device=device, dtype=dtype)


def resample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Anti-aliased resize of [N, C, H, W] to ``size`` x ``size`` (Crowson's ``resample``).

    A dimension being shrunk is first low-pass filtered with a separable Lanczos-2
    kernel (reflect padding); then bicubic interpolation with align_corners=True.
    """
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    if size < h:
        k = _lanczos_kernel(h, size, str(x.device), x.dtype)
        p = (k.numel() - 1) // 2
        y = F.conv2d(F.pad(y, (0, 0, p, p), mode="reflect"), k.view(1, 1, -1, 1))
    if size < w:
        k = _lanczos_kernel(w, size, str(x.device), x.dtype)
        p = (k.numel() - 1) // 2
        y = F.conv2d(F.pad(y, (p, p, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.interpolate(y.view(n, c, h, w), size=(size, size), mode="bicubic", align_corners=True)


def uniform_draws(shape, generators, device, dtype=torch.float32) -> torch.Tensor:
    """[len(generators), *shape] uniforms in [0, 1), run r's from ``generators[r]`` (CPU generators, so a
    seed means the same on every device), drawn into one buffer -- pinned for CUDA, so that its one copy
    to ``device`` is asynchronous -- and moved once.  ``torch.rand(shape, generator=g)`` per run, exactly."""
    device = torch.device(device)
    buf = torch.empty((len(generators), *shape), dtype=dtype, pin_memory=device.type == "cuda")
    for row, g in zip(buf, generators):
        row.uniform_(generator=g)
    return buf if device.type == "cpu" else buf.to(device, non_blocking=True)


def gumbel_noise(shape, generators, device) -> torch.Tensor:
    """Standard Gumbel noise [B, *shape], run r's from ``generators[r]`` (F.gumbel_softmax uses the global
    RNG); the transform runs on ``device``."""
    u = uniform_draws(shape, generators, device).clamp_(1e-10, 1.0)
    return -torch.log(-torch.log(u))


def laplace_noise(shape, generators, device) -> torch.Tensor:
    """Standard Laplace(0, 1) noise [B, *shape] by inverse CDF, run r's from ``generators[r]``."""
    u = uniform_draws(shape, generators, device, torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.5 - 1e-12))).float()


def sample_codes(probs: torch.Tensor, generators) -> torch.Tensor:
    """One code per position [B, L] from probabilities [B, L, V], run r's from ``generators[r]``.

    On the CPU: ``torch.multinomial`` (Crowson's call; its exponential race draws L x V numbers).  On
    another device the probabilities stay there: the inverse CDF of one uniform per position, drawn
    on the CPU and moved in one copy (L numbers instead of L x V, and no device-to-host copy of
    [B, L, V]).  Both sample the same distribution from the same generator, but not the same codes."""
    if probs.device.type == "cpu":
        return torch.stack([torch.multinomial(p.detach(), 1, generator=g)[:, 0] for p, g in zip(probs, generators)])
    return inverse_cdf_codes(probs, uniform_draws(probs.shape[1:2], generators, probs.device, torch.float64))


def inverse_cdf_codes(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The code at each position [B, L] whose cumulative probability first exceeds ``u`` [B, L] x the total."""
    cdf = probs.detach().double().cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """Per-image L2 total variation with replicate padding (Crowson's tv_loss): [B]."""
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return (dx**2 + dy**2).flatten(1).mean(1)


def vector_quantize(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest codebook vector at each position of z [B, D, h, w] (codebook [V, D]) by squared
    L2 distance, with an identity straight-through gradient (Crowson's ``vector_quantize``,
    docs/methods.md §4): the commitment loss of VQ-VAE training plays no part here."""
    x = z.movedim(1, -1)  # [B, h, w, D]
    # ‖x‖² is the same for every code at a position, so it cannot change the argmin: left out.
    dist = codebook.pow(2).sum(-1) - 2 * x @ codebook.T  # [B, h, w, V]
    nearest = codebook[dist.argmin(-1)].movedim(-1, 1)  # [B, D, h, w]
    return replace_grad(nearest, z)


def cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of ``module`` with floating-point weights in ``dtype``, made tensor by tensor:
    ``deepcopy(module).to(dtype)`` would hold a second full-precision copy at its peak."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in module.parameters()}
    memo.update({id(b): b.to(dtype) if b.is_floating_point() else b.clone() for b in module.buffers()})
    return copy.deepcopy(module, memo)
