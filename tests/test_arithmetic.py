"""The arithmetic of clipguide.engine.ops, clipguide.engine.losses and clipguide.engine.cutouts pinned to known values and
independent references.

A mutation test found formulas checked only against themselves: an un-normalised Lanczos kernel,
a spherical distance cubed, the farthest codebook vector instead of the nearest, a one-sided
Laplace, an inverted ClampWithGrad all passed, because the tests built their expectation with
the function under test.  Every expectation here comes from elsewhere:

* hand-computed values (the spherical distance of unit vectors at known angles is θ²/2, and the
  prompt losses of 2-D embeddings at known angles; tv_loss of a linear ramp; bilinear and bicubic
  weights; the ClampWithGrad table; a 90° random_affine is rot90);
* Crowson's notebook operations written out in tests/reference.py (sinc, lanczos, ramp,
  resample, ClampWithGrad), never clipguide's own;
* brute force (nearest codebook vector by a loop over codes; grid_sample by explicit bilinear
  sampling with a border clamp);
* distributions' known moments (standard Laplace: mean 0, median 0, P(x>0) = 1/2, E|x| = 1,
  var 2, P(|x|>2) = e⁻²; standard Gumbel: mean γ, var π²/6, P(x≤0) = 1/e), on 200k seeded
  draws, the tolerance 5 standard errors of each estimate;
* the ranges the cutout draws must cover (draw_sizes, draw_offsets), each end reached.

Every random tensor comes from a seeded torch.Generator.
"""

import math

import pytest
import torch

from clipguide.engine import cutouts
from clipguide.config import RunConfig
from clipguide.engine.cutouts import crop_resize, draw_offsets, draw_sizes, random_affine, resize_matrix
from clipguide.engine.losses import cosine_loss, cosine_similarities, prompt_similarity, spherical_distance, spherical_loss
from clipguide.engine.ops import clamp_with_grad, gumbel_noise, laplace_noise, replace_grad, resample, tv_loss, vector_quantize
from reference import ClampWithGrad, per_crop
from reference import resample as crowson_resample

N_DRAWS = 200_000
EULER_GAMMA = 0.5772156649015329


def gen(seed):
    return torch.Generator().manual_seed(seed)


def unit(angle):
    """The 2-D unit vector at ``angle`` radians, float64."""
    return torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)


def assert_within(estimate, expected, se, what, k=5.0):
    assert abs(estimate - expected) < k * se, f"{what}: {estimate:.5f}, expected {expected:.5f} ± {k * se:.5f}"


# ----------------------------------------------------------------------------- resample (Lanczos-2, then bicubic)

SIZES = [(17, 17, 7), (33, 21, 10), (64, 64, 24), (31, 13, 19), (9, 9, 23), (12, 40, 12), (5, 5, 5)]  # (h, w, size)


@pytest.mark.parametrize("h,w,size", SIZES)
@pytest.mark.parametrize("level", [0.0, 0.37, 1.0, -2.5])
def test_resample_keeps_a_flat_image_flat(h, w, size, level):
    """A normalised low-pass kernel and bicubic weights each sum to 1: a constant image stays that constant,
    shrinking or enlarging, odd sizes included (an un-normalised kernel scales it by the kernel's sum)."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        x = torch.full((2, 3, h, w), level, dtype=dtype)
        out = resample(x, size)
        assert out.shape == (2, 3, size, size)
        assert torch.allclose(out, torch.full_like(out, level), atol=tol), (dtype, float((out - level).abs().max()))


@pytest.mark.parametrize("h,w,size", SIZES)
def test_resample_is_crowsons_resample(h, w, size):
    """clipguide's resample against the notebook's sinc, lanczos, ramp and resample written out (tests/reference.py)."""
    g = gen(h * 100 + w)
    x64 = torch.rand(2, 3, h, w, generator=g, dtype=torch.float64)
    assert torch.allclose(resample(x64, size), crowson_resample(x64, size), atol=1e-12)
    x32 = x64.float()
    assert torch.allclose(resample(x32, size), crowson_resample(x32, size), atol=1e-6)


def test_crowsons_lanczos_kernel_for_a_halving_is_the_known_one():
    """The written-out reference itself on a known case: for ratio 1/2 the taps sit at 0, ±0.5, ±1, ±1.5,
    sinc is 0 at ±1, and L(x) = sinc(x)·sinc(x/2) gives L(0.5) = (2/π)·(2√2/π), L(1.5) = -(2/(3π))·(2√2/(3π))."""
    from reference import lanczos, ramp

    taps = ramp(0.5, 2, torch.float64)
    assert torch.allclose(taps, torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], dtype=torch.float64))
    l05, l15 = (2 / math.pi) * (2 * math.sqrt(2) / math.pi), -(2 / (3 * math.pi)) * (2 * math.sqrt(2) / (3 * math.pi))
    raw = torch.tensor([l15, 0.0, l05, 1.0, l05, 0.0, l15], dtype=torch.float64)
    assert torch.allclose(lanczos(taps, 2), raw / raw.sum(), atol=1e-15)


@pytest.mark.parametrize("method", ["lanczos", "bilinear"])
def test_crop_resize_is_the_per_crop_loop_with_crowsons_resample(method):
    """The batched crop-resize (two matmuls) against slicing each crop (reflect-padding the image where a
    zoomed-out view reaches outside it), resizing it with the written-out resample, and mirroring it."""
    g = gen(21)
    image = torch.rand(3, 30, 38, generator=g, dtype=torch.float64)
    sizes = [30, 12, 25, 7, 40, 19]
    offsets = [(0, 8), (18, 26), (3, 0), (11, 17), (-6, -1), (5, 9)]  # (-6, -1) with size 40: reflect-padded
    flips = [False, True, False, True, True, False]
    for cut in (16, 9):
        want = per_crop(image, sizes, offsets, flips, cut, method)
        assert torch.allclose(crop_resize(image, sizes, offsets, flips, cut, method), want, atol=1e-12)
        got32 = crop_resize(image.float(), sizes, offsets, flips, cut, method)
        assert torch.allclose(got32, per_crop(image.float(), sizes, offsets, flips, cut, method), atol=1e-5)


def test_resize_matrix_known_values():
    """Bilinear (align_corners=False) and bicubic (A = -0.75, align_corners=True) weights worked out by hand."""
    f64 = torch.float64
    t = lambda rows: torch.tensor(rows, dtype=f64)  # noqa: E731
    # bilinear 2 -> 4: sources at -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    assert torch.allclose(resize_matrix(2, 4, "bilinear", f64), t([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]))
    # bilinear 4 -> 2: sources at 0.5 and 2.5, the mean of two neighbours
    assert torch.allclose(resize_matrix(4, 2, "bilinear", f64), t([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]))
    # lanczos at the same size: no low-pass, bicubic exactly on the samples
    assert torch.allclose(resize_matrix(7, 7, "lanczos", f64), torch.eye(7, dtype=f64), atol=1e-12)
    # lanczos 2 -> 3: bicubic at 0, 0.5, 1; at 0.5 the cubic weights (-0.09375, 0.59375, 0.59375, -0.09375)
    # fold onto the two samples (the ends clamp): 0.5 each
    assert torch.allclose(resize_matrix(2, 3, "lanczos", f64), t([[1, 0], [0.5, 0.5], [0, 1]]), atol=1e-12)
    # lanczos 3 -> 5: at 0.5 the weights fall on samples -1 (clamped to 0), 0, 1, 2
    row = [-0.09375 + 0.59375, 0.59375, -0.09375]
    assert torch.allclose(resize_matrix(3, 5, "lanczos", f64)[1], t(row), atol=1e-12)


@pytest.mark.parametrize("src,dst", [(24, 7), (31, 16), (9, 20), (40, 40), (13, 5)])
def test_resize_matrix_is_crowsons_resample_of_each_sample(src, dst):
    """Column j of the lanczos matrix is the written-out resample of the unit impulse at j; every row sums
    to 1 for both methods."""
    basis = torch.eye(src, dtype=torch.float64).view(src, 1, src, 1)
    want = crowson_resample(basis, (dst, 1))[:, 0, :, 0].T
    got = resize_matrix(src, dst, "lanczos", torch.float64)
    assert torch.allclose(got, want, atol=1e-12)
    for method in ("lanczos", "bilinear"):
        sums = resize_matrix(src, dst, method, torch.float64).sum(1)
        assert torch.allclose(sums, torch.ones(dst, dtype=torch.float64), atol=1e-12), method


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("angle", [0.0, math.pi / 6, math.pi / 3, math.pi / 2, 2 * math.pi / 3, 5 * math.pi / 6])
def test_spherical_distance_is_half_the_squared_angle(angle):
    """|a-b| = 2·sin(θ/2) for unit vectors, so 2·arcsin(|a-b|/2)² = θ²/2."""
    d = spherical_distance(unit(0.0), unit(angle))
    assert math.isclose(float(d), angle**2 / 2, rel_tol=1e-9, abs_tol=1e-12)


def test_spherical_distance_known_values():
    e = torch.eye(3, dtype=torch.float64)
    assert float(spherical_distance(e[0], e[0])) == 0.0  # identical
    assert math.isclose(float(spherical_distance(e[0], e[2])), math.pi**2 / 8, rel_tol=1e-12)  # orthogonal
    assert math.isclose(float(spherical_distance(e[1], -e[1])), math.pi**2 / 2, rel_tol=1e-12)  # opposite
    # along the last dimension, broadcasting the rest
    pairs = spherical_distance(e[:, None], e[None])  # [3, 3]
    want = torch.full((3, 3), math.pi**2 / 8, dtype=torch.float64).fill_diagonal_(0.0)
    assert torch.allclose(pairs, want, atol=1e-12)


def test_spherical_loss_known_value():
    """Two cutouts at 0 and 60° (lengths 2 and 0.5: the loss normalises), targets at 0 (w 1) and 90° (w -0.5):
    Σ_t |w_t|·mean_i sign(w_t)·θ_it²/2 = mean(0, (π/3)²/2) - 0.5·mean((π/2)²/2, (π/6)²/2) = -π²/144.
    A second run with a padded (weight-0) target and its own cutouts checks the runs stay apart."""
    cuts = torch.stack([torch.stack([2 * unit(0), 0.5 * unit(math.pi / 3)]), torch.stack([unit(math.pi / 2), unit(math.pi)])])
    embeds = torch.stack([torch.stack([unit(0), unit(math.pi / 2)]), torch.stack([unit(0), unit(1.0)])])
    weights = torch.tensor([[1.0, -0.5], [2.0, 0.0]], dtype=torch.float64)
    stops = torch.full((2, 2), -math.inf, dtype=torch.float64)
    loss = spherical_loss(cuts, embeds, weights, stops)
    run1 = 2.0 * ((math.pi / 2) ** 2 / 2 + math.pi**2 / 2) / 2
    assert torch.allclose(loss, torch.tensor([-math.pi**2 / 144, run1], dtype=torch.float64), atol=1e-12)


def test_spherical_loss_gradient_and_signed_stop_known_values():
    """Cutouts at angles φ from a target at 0 have loss φ²/2 each, so d loss / dφ = φ (over the mean of 2).
    A stop s cuts the gradient where the signed distance sign(w)·φ²/2 is below s; the value is unchanged."""
    phi = torch.tensor([0.3, 1.2], dtype=torch.float64, requires_grad=True)
    target = unit(0.0)[None, None]

    def loss_of(w, s):
        cuts = torch.stack([phi.cos(), phi.sin()], -1)[None]  # [1, 2, 2]
        return spherical_loss(cuts, target, torch.tensor([[w]], dtype=torch.float64), torch.tensor([[s]], dtype=torch.float64))

    d = [0.3**2 / 2, 1.2**2 / 2]  # 0.045, 0.72
    cases = [  # (weight, stop, value, gradient in φ)
        (1.0, -math.inf, (d[0] + d[1]) / 2, [0.3 / 2, 1.2 / 2]),
        (1.0, 0.1, (d[0] + d[1]) / 2, [0.0, 1.2 / 2]),  # φ=0.3 is already closer than the stop
        (2.0, 1.0, d[0] + d[1], [0.0, 0.0]),
        (-0.5, -math.inf, -0.5 * (d[0] + d[1]) / 2, [-0.5 * 0.3 / 2, -0.5 * 1.2 / 2]),
        (-0.5, -0.1, -0.5 * (d[0] + d[1]) / 2, [-0.5 * 0.3 / 2, 0.0]),  # φ=1.2 is already farther than -stop
    ]
    for w, s, value, grad in cases:
        loss = loss_of(w, s)
        (g,) = torch.autograd.grad(loss.sum(), phi)
        assert math.isclose(float(loss.detach()), value, rel_tol=1e-12), (w, s)
        assert torch.allclose(g, torch.tensor(grad, dtype=torch.float64), atol=1e-12), (w, s, g)


def test_cosine_loss_and_similarities_known_values():
    """Cutouts at 0 and 60°, targets at 0 (w 1) and 90° (w -0.5): cosines [[1, 0], [1/2, √3/2]], so the loss
    -Σ_t w_t·mean_i cos = -(1·3/4 - 0.5·√3/4) and the reported similarity (positive weights) is 3/4."""
    cuts = torch.stack([3 * unit(0), unit(math.pi / 3)])[None]
    embeds = torch.stack([unit(0), 0.2 * unit(math.pi / 2)])[None]
    weights = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    cos = torch.tensor([[[1.0, 0.0], [0.5, math.sqrt(3) / 2]]], dtype=torch.float64)
    assert torch.allclose(cosine_similarities(cuts, embeds), cos, atol=1e-12)
    stops = torch.full((1, 2), -math.inf, dtype=torch.float64)
    assert math.isclose(float(cosine_loss(cuts, embeds, weights, stops)), -(0.75 - 0.5 * math.sqrt(3) / 4), rel_tol=1e-12)
    assert math.isclose(float(prompt_similarity(cuts, embeds, weights)), 0.75, rel_tol=1e-12)
    # two positive weights: the weighted mean of their mean cosines, (1·0.75 + 3·√3/4) / 4
    both = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    assert math.isclose(float(prompt_similarity(cuts, embeds, both)), (0.75 + 3 * math.sqrt(3) / 4) / 4, rel_tol=1e-12)


# ----------------------------------------------------------------------------- vector_quantize


def brute_force_nearest(z, codebook):
    """For each position of z [B, D, h, w], the codebook row at the smallest Σ_d (z_d - c_d)², by a loop."""
    b, d, h, w = z.shape
    out = torch.empty_like(z)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                v = z[i, :, y, x]
                dists = [float(((v - c) ** 2).sum()) for c in codebook]
                out[i, :, y, x] = codebook[dists.index(min(dists))]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vector_quantize_picks_the_nearest_code_with_an_identity_gradient(seed):
    g = gen(seed)
    z = torch.randn(2, 4, 3, 5, generator=g).requires_grad_()
    codebook = torch.randn(11, 4, generator=g) * 1.5
    q = vector_quantize(z, codebook)
    assert torch.equal(q.detach(), brute_force_nearest(z.detach(), codebook))
    upstream = torch.randn(q.shape, generator=g)
    (q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)  # straight-through: the gradient passes unchanged


def test_vector_quantize_hand_made_codebook():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [4.0, 4.0]])
    z = torch.tensor([[0.1, -0.2], [0.9, 0.3], [0.2, 0.7], [3.0, 2.9], [-5.0, 0.6]]).T.reshape(1, 2, 1, 5)
    want = codebook[[0, 1, 2, 3, 2]].T.reshape(1, 2, 1, 5)
    assert torch.equal(vector_quantize(z, codebook), want)


# ----------------------------------------------------------------------------- noise


def test_laplace_noise_is_a_standard_laplace():
    x = laplace_noise((N_DRAWS,), [gen(7)], "cpu")[0].double()
    n = N_DRAWS
    assert_within(float(x.mean()), 0.0, math.sqrt(2 / n), "mean")  # var 2
    assert_within(float((x > 0).double().mean()), 0.5, math.sqrt(0.25 / n), "P(x>0)")
    assert_within(float(x.median()), 0.0, 1 / math.sqrt(n), "median")  # 1/(2·f(0)·√n), f(0) = 1/2
    assert_within(float(x.abs().mean()), 1.0, 1 / math.sqrt(n), "E|x|")  # |x| ~ Exp(1): var 1
    assert_within(float(x.pow(2).mean()), 2.0, math.sqrt(20 / n), "E x²")  # E x⁴ = 24: var(x²) = 20
    p2 = math.exp(-2)
    assert_within(float((x.abs() > 2).double().mean()), p2, math.sqrt(p2 * (1 - p2) / n), "P(|x|>2)")


def test_gumbel_noise_is_a_standard_gumbel():
    x = gumbel_noise((N_DRAWS,), [gen(8)], "cpu")[0].double()
    n, var = N_DRAWS, math.pi**2 / 6
    assert_within(float(x.mean()), EULER_GAMMA, math.sqrt(var / n), "mean")
    # the sample variance's standard error is √((μ4 - σ⁴)/n); a Gumbel's excess kurtosis is 12/5, so μ4 - σ⁴ = 4.4·σ⁴
    assert_within(float(x.var()), var, math.sqrt(4.4 * var**2 / n), "variance")
    p0 = math.exp(-1)  # CDF exp(-exp(-x)) at 0
    assert_within(float((x <= 0).double().mean()), p0, math.sqrt(p0 * (1 - p0) / n), "P(x<=0)")


@pytest.mark.parametrize("noise", [laplace_noise, gumbel_noise])
def test_noise_is_drawn_from_the_given_generator(noise):
    g = gen(9)
    state = g.get_state()
    a = noise((4, 5), [g], "cpu")
    b = noise((4, 5), [torch.Generator().set_state(state)], "cpu")
    assert torch.equal(a, b) and a.shape == (1, 4, 5) and a.dtype == torch.float32
    assert not torch.equal(a, noise((4, 5), [g], "cpu"))  # the generator moved on
    assert not torch.equal(a, noise((4, 5), [gen(10)], "cpu"))
    pair = noise((4, 5), [torch.Generator().set_state(state), gen(10)], "cpu")  # each run from its own generator
    assert torch.equal(pair[0], a[0]) and not torch.equal(pair[1], a[0])


# ----------------------------------------------------------------------------- clamp_with_grad, replace_grad

CLAMP_TABLE = [  # (input, upstream gradient, expected gradient) for [0, 1]; a descent step moves x by -grad
    (0.5, 1.0, 1.0), (0.5, -1.0, -1.0), (0.0, 2.0, 2.0), (0.0, -2.0, -2.0), (1.0, 3.0, 3.0), (1.0, -3.0, -3.0),
    (-0.5, -1.0, -1.0),  # below 0, a step up passes
    (-0.5, 1.0, 0.0),  # below 0, a step further down is cut
    (-2.0, -0.25, -0.25), (-2.0, 0.25, 0.0),
    (1.5, 1.0, 1.0),  # above 1, a step down passes
    (1.5, -1.0, 0.0),  # above 1, a step further up is cut
    (3.0, 0.5, 0.5), (3.0, -0.5, 0.0),
    (-1.0, 0.0, 0.0),
]


def test_clamp_with_grad_table():
    x = torch.tensor([r[0] for r in CLAMP_TABLE], requires_grad=True)
    out = clamp_with_grad(x)
    assert torch.equal(out.detach(), x.detach().clamp(0, 1))
    out.backward(torch.tensor([r[1] for r in CLAMP_TABLE]))
    assert x.grad.tolist() == [r[2] for r in CLAMP_TABLE]


def test_clamp_with_grad_other_bounds_and_the_notebook():
    x = torch.tensor([-3.0, -1.5, 0.0, 2.5, 4.0], requires_grad=True)
    clamp_with_grad(x, -2.0, 3.0).backward(torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0]))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, -1.0, 0.0]
    g = gen(11)
    x = (torch.randn(200, generator=g) * 1.5 + 0.5).requires_grad_()
    y = x.detach().clone().requires_grad_()
    up = torch.randn(200, generator=g)
    clamp_with_grad(x, 0, 1).backward(up)
    ClampWithGrad.apply(y, 0, 1).backward(up)
    assert torch.equal(x.grad, y.grad)


def test_replace_grad_known_tensors():
    """Value of the first argument; the whole gradient goes to the second, summed to its (broadcast) shape."""
    fwd = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    bwd = torch.tensor([[10.0, 20.0, 30.0]], requires_grad=True)
    out = replace_grad(fwd, bwd)
    assert torch.equal(out.detach(), fwd.detach())
    out.backward(torch.tensor([[1.0, -2.0, 0.5], [3.0, 4.0, -1.0]]))
    assert bwd.grad.tolist() == [[4.0, 2.0, -0.5]]
    assert fwd.grad is None


# ----------------------------------------------------------------------------- tv_loss


def test_tv_loss_known_images():
    """Replicate padding makes the last column's dx and the last row's dy zero, so a ramp a·i + b·j over
    [C, H, W] has Σ = C·(b²·H·(W-1) + a²·(H-1)·W), divided by C·H·W."""
    step = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # dx 1 in column 0 only: (1 + 1) / 4
    assert torch.allclose(tv_loss(step), torch.tensor([0.5]))
    h, w, a, b = 5, 7, 0.3, -0.2
    i, j = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    ramp = (a * i + b * j).expand(3, h, w)
    flat = torch.full((3, h, w), 0.7, dtype=torch.float64)
    want = (b**2 * h * (w - 1) + a**2 * (h - 1) * w) / (h * w)
    assert torch.allclose(tv_loss(torch.stack([ramp, flat])), torch.tensor([want, 0.0], dtype=torch.float64), atol=1e-12)


# ----------------------------------------------------------------------------- random_affine


def sample_by_hand(img, theta):
    """affine_grid + grid_sample(bilinear, border, align_corners=False) of [C, H, W] with theta [2, 3],
    written out: each output pixel centre in [-1, 1], mapped by theta, unnormalised, clamped, interpolated."""
    c, h, w = img.shape
    i, j = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    x, y = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
    sx = theta[0, 0] * x + theta[0, 1] * y + theta[0, 2]
    sy = theta[1, 0] * x + theta[1, 1] * y + theta[1, 2]
    px = (((sx + 1) * w - 1) / 2).clamp(0, w - 1)
    py = (((sy + 1) * h - 1) / 2).clamp(0, h - 1)
    x0, y0 = px.floor().long(), py.floor().long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    fx, fy = px - x0, py - y0
    v = img.double()
    return (v[:, y0, x0] * (1 - fx) * (1 - fy) + v[:, y0, x1] * fx * (1 - fy)
            + v[:, y1, x0] * (1 - fx) * fy + v[:, y1, x1] * fx * fy)


def test_random_affine_with_no_angle_is_the_identity():
    cuts = torch.rand(3, 3, 12, 12, generator=gen(12))
    assert torch.allclose(random_affine(cuts, 0.0, gen(13)), cuts, atol=1e-6)


def test_random_affine_at_90_degrees_rotates_a_square(monkeypatch):
    """With its draws scripted to the top of the angle range and a zero shift, a 90° affine turns the square
    a quarter (torch.rot90: out[i, j] = in[j, W-1-i])."""
    cuts = torch.rand(2, 3, 10, 10, generator=gen(14))

    def scripted(*shape, generator=None, **kw):  # rand(n) -> the angle draw 1 (+degrees); rand(n, 2) -> shift 0
        return torch.full(shape, 1.0 if len(shape) == 1 else 0.5)

    monkeypatch.setattr(cutouts.torch, "rand", scripted)
    out = random_affine(cuts, 90.0, torch.Generator())
    monkeypatch.undo()
    assert torch.allclose(out, torch.rot90(cuts, 1, (-2, -1)), atol=1e-5)
    assert not torch.allclose(out, torch.rot90(cuts, -1, (-2, -1)), atol=1e-2)


def test_random_affine_is_rotation_and_shift_sampled_by_hand():
    """The draws read from a copy of the generator: angle (2u-1)·degrees, shift (2v-1)·degrees/150 grid units;
    each cutout against sample_by_hand with theta [[cos, -sin, sx], [sin, cos, sy]]."""
    n, degrees = 4, 30.0
    cuts = torch.rand(n, 3, 16, 16, generator=gen(15))
    g = gen(16)
    copy = torch.Generator().set_state(g.get_state())
    out = random_affine(cuts, degrees, g)
    u, v = torch.rand(n, generator=copy).double(), torch.rand(n, 2, generator=copy).double()
    angle, shift = (2 * u - 1) * math.radians(degrees), (2 * v - 1) * degrees / 150
    assert angle.abs().max() <= math.radians(degrees) and shift.abs().max() <= degrees / 150
    for k in range(n):
        c, s = math.cos(angle[k]), math.sin(angle[k])
        theta = torch.tensor([[c, -s, shift[k, 0]], [s, c, shift[k, 1]]], dtype=torch.float64)
        assert torch.allclose(out[k].double(), sample_by_hand(cuts[k], theta), atol=1e-5), k


# ----------------------------------------------------------------------------- draw_sizes, draw_offsets


@pytest.mark.parametrize("inclusive", [1, 0])
def test_draw_offsets_cover_their_ranges_uniformly(inclusive):
    """Per axis, a crop of side s in a side-L image starts at 0 .. L-s (Crowson, inclusive) or 0 .. L-s-1
    (Aleph2Image's randint), each equally often; a crop as large as the axis starts at 0."""
    shape, n = (10, 13), 4000
    for s in (6, 10):
        offs = torch.tensor(draw_offsets(shape, [s] * n, inclusive, gen(17 + s)))
        for axis, side in enumerate(shape):
            top = max(side - s + inclusive, 1)  # number of possible starts
            counts = torch.bincount(offs[:, axis], minlength=top)
            assert offs[:, axis].min() == 0 and len(counts) == top, (s, axis, counts)
            p = 1 / top
            assert (counts / n - p).abs().max() <= 5 * math.sqrt(p * (1 - p) / n), (s, axis, counts)


def test_draw_offsets_of_zoomed_out_views_keep_the_image_inside():
    """A crop larger than the image (cut_mirror) starts between L - s and 0 inclusive, so it contains the image."""
    offs = torch.tensor(draw_offsets((10, 13), [16] * 3000, 1, gen(19)))
    assert set(offs[:, 0].tolist()) == set(range(-6, 1)) and set(offs[:, 1].tolist()) == set(range(-3, 1))


def test_draw_sizes_ranges():
    """Crowson: u**cut_pow·(side - lo) + lo, truncated, lo = min(side, cut): every size in lo .. side, uniform
    for cut_pow 1 (mean ≈ (lo + side)/2), piled near lo for cut_pow 4 (E u⁴ = 1/5).  Aleph2Image's uniform law:
    side·[lo, hi), truncated.  The normal law clamps its fractions to [lo, hi]."""
    n, side = 4000, 64
    sizes = torch.tensor(draw_sizes(RunConfig(cutn=n), side, 24, gen(20)), dtype=torch.float64)
    assert sizes.min() == 24 and sizes.max() == 63  # side itself only when u = 1
    sd = (side - 24) / math.sqrt(12)  # a uniform's standard deviation
    assert_within(float(sizes.mean()), (24 + side) / 2 - 0.5, sd / math.sqrt(n), "mean size, cut_pow 1")  # -0.5: int()
    steep = torch.tensor(draw_sizes(RunConfig(cutn=n, cut_pow=4.0), side, 24, gen(21)), dtype=torch.float64)
    sd4 = (side - 24) * math.sqrt(1 / 9 - 1 / 25)  # var u⁴ = 1/9 - 1/25
    assert_within(float(steep.mean()), 24 + (side - 24) / 5 - 0.5, sd4 / math.sqrt(n), "mean size, cut_pow 4")
    assert draw_sizes(RunConfig(cutn=50), 16, 24, gen(22)) == [16] * 50  # an image smaller than the cut: whole
    uni = draw_sizes(RunConfig(cutn=n, cut="uniform", cut_range=(0.5, 0.9)), side, 24, gen(23))
    assert min(uni) == 32 and max(uni) == 57  # int(64·0.5) .. int(64·0.9 - ε)
    nrm = draw_sizes(RunConfig(cutn=n, cut="normal", cut_range=(0.7, 0.3, 0.4, 0.95)), side, 24, gen(24))
    assert min(nrm) == int(side * 0.4) and max(nrm) == int(side * 0.95)  # clamped at both ends
