"""Crowson's notebook operations written out once, as independent references for the tests.

These are the VQGAN+CLIP / dVAE notebooks' own definitions (docs/methods.md §1-§4), spelled out here
instead of imported from ``clipguide``, so a test that compares clipguide with them checks
clipguide against something other than itself: sinc, lanczos, ramp and resample (the Lanczos-2
low-pass, reflect padding, then bicubic with align_corners=True), MakeCutouts (one crop and one
resample per cutout, then the clamp), ReplaceGrad, ClampWithGrad, vector_quantize and the
Prompt loss with its signed stop.  Used by test_arithmetic.py, test_faithful.py,
test_speed_paths.py and test_loop.py.

The one liberty taken: the notebook builds its kernel in float32 (``torch.empty`` in ``ramp``);
here it is built in float64 when the input is float64, so float64 comparisons can be tight.
"""

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- resample


def sinc(x):
    return torch.where(x != 0, torch.sin(math.pi * x) / (math.pi * x), x.new_ones([]))


def lanczos(x, a):
    cond = torch.logical_and(-a < x, x < a)
    out = torch.where(cond, sinc(x) * sinc(x / a), x.new_zeros([]))
    return out / out.sum()


def ramp(ratio, width, dtype=torch.float32):
    n = math.ceil(width / ratio + 1)
    out = torch.empty([n], dtype=dtype)
    cur = 0
    for i in range(out.shape[0]):
        out[i] = cur
        cur += ratio
    return torch.cat([-out[1:].flip([0]), out])[1:-1]


def resample(input, size, align_corners=True):
    """Crowson's resample; ``size`` an int (square, as clipguide's) or (dh, dw)."""
    n, c, h, w = input.shape
    dh, dw = (size, size) if isinstance(size, int) else size
    kdtype = torch.float64 if input.dtype == torch.float64 else torch.float32

    input = input.view([n * c, 1, h, w])

    if dh < h:
        kernel_h = lanczos(ramp(dh / h, 2, kdtype), 2).to(input.device, input.dtype)
        pad_h = (kernel_h.shape[0] - 1) // 2
        input = F.pad(input, (0, 0, pad_h, pad_h), "reflect")
        input = F.conv2d(input, kernel_h[None, None, :, None])

    if dw < w:
        kernel_w = lanczos(ramp(dw / w, 2, kdtype), 2).to(input.device, input.dtype)
        pad_w = (kernel_w.shape[0] - 1) // 2
        input = F.pad(input, (pad_w, pad_w, 0, 0), "reflect")
        input = F.conv2d(input, kernel_w[None, None, None, :])

    input = input.view([n, c, h, w])
    return F.interpolate(input, (dh, dw), mode="bicubic", align_corners=align_corners)


def per_crop(image, sizes, offsets, flips, cut, method="lanczos"):
    """The per-cutout loop of the notebooks: slice each crop of [C, H, W] (reflect-padding the image
    first where a crop reaches outside it), resize it (``resample`` above, or Aleph2Image's bilinear
    F.interpolate), mirror it where asked -> [len(sizes), C, cut, cut]."""
    h, w = image.shape[-2:]
    out = []
    for s, (oy, ox), flip in zip(sizes, offsets, flips):
        pad = max(0, -oy, -ox, oy + s - h, ox + s - w)
        src = F.pad(image[None], (pad,) * 4, mode="reflect") if pad else image[None]
        c = src[:, :, oy + pad : oy + pad + s, ox + pad : ox + pad + s]
        c = resample(c, cut) if method == "lanczos" else F.interpolate(c, size=(cut, cut), mode="bilinear", align_corners=False)
        out.append(c.flip(-1) if flip else c)
    return torch.cat(out)


# ----------------------------------------------------------------------------- autograd functions


class ReplaceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_forward, x_backward):
        ctx.shape = x_backward.shape
        return x_forward

    @staticmethod
    def backward(ctx, grad_in):
        return None, grad_in.sum_to_size(ctx.shape)


class ClampWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, min, max):
        ctx.min, ctx.max = min, max
        ctx.save_for_backward(input)
        return input.clamp(min, max)

    @staticmethod
    def backward(ctx, grad_in):
        input, = ctx.saved_tensors
        return grad_in * (grad_in * (input - input.clamp(ctx.min, ctx.max)) >= 0), None, None


# ----------------------------------------------------------------------------- quantisation, cutouts, prompts


def notebook_vector_quantize(x, codebook):
    d = x.pow(2).sum(dim=-1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * x @ codebook.T
    x_q = F.one_hot(d.argmin(-1), codebook.shape[0]).to(d.dtype) @ codebook
    return ReplaceGrad.apply(x_q, x)


def notebook_cutouts(img, boxes, cut_size):
    """MakeCutouts.forward with its draws given: one crop and one Lanczos resample per cutout, then the clamp."""
    cutouts = [resample(img[:, :, y : y + size, x : x + size], cut_size) for size, (y, x) in boxes]
    return ClampWithGrad.apply(torch.cat(cutouts, dim=0), 0, 1)


def notebook_prompt(input, embed, weight, stop):
    """Crowson's Prompt.forward: the distance is signed by the weight before the stop applies."""
    input_normed = F.normalize(input.unsqueeze(1), dim=2)
    embed_normed = F.normalize(embed.unsqueeze(0), dim=2)
    dists = input_normed.sub(embed_normed).norm(dim=2).div(2).arcsin().pow(2).mul(2)
    dists = dists * torch.sign(torch.as_tensor(weight))
    return abs(weight) * ReplaceGrad.apply(dists, torch.maximum(dists, torch.as_tensor(stop))).mean()
