"""What keeps the loop fast on a GPU, pinned on the CPU: one device read per step, the random draws
drawn on the CPU in one buffer per step and moved once, and the samplers a device uses."""

import copy
import sys

import pytest
import torch

import clipguide.engine.loop as loop_module
from clipguide import get_preset, optimise
from clipguide.engine.devices import to_host
from clipguide.engine.ops import inverse_cdf_codes, sample_codes, uniform_draws
from clipguide.testing import random_vqgan

from test_options import TINY_VQ

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
# reads of tensors that live on the CPU whatever the device: the cutouts' boxes, drawn from the runs' CPU
# generators (draw_sizes, draw_offsets, crops, cut_run); the story schedule's phrase counts (Targets.at); Adam's step
# count (torch.optim's _get_value; a CPU tensor unless the optimiser is capturable); and what to_host brought
# back (check_finite)
HOST_SIDE = {"draw_sizes", "draw_offsets", "crops", "cut_run", "at", "_get_value", "check_finite"}


class ReadCounter:
    """Counts reads of tensor values (what synchronises with a device) made inside the loop's steps."""

    def __init__(self, monkeypatch):
        self.on, self.by_caller, self.to_host_calls = False, {}, 0
        for name in READS:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self.counting(real))
        for name in ("evaluate_step", "update"):
            monkeypatch.setattr(loop_module, name, self.hot(getattr(loop_module, name)))
        real_to_host = loop_module.to_host

        def counted_to_host(*tensors):
            self.to_host_calls += self.on
            return real_to_host(*tensors)

        monkeypatch.setattr(loop_module, "to_host", counted_to_host)

    def counting(self, real):
        def read(t, *a, **k):
            if self.on:
                frame = sys._getframe(1)
                caller = frame.f_code.co_name if frame.f_code.co_name != "<listcomp>" else frame.f_back.f_code.co_name
                self.by_caller[caller] = self.by_caller.get(caller, 0) + 1
            return real(t, *a, **k)
        return read

    def hot(self, fn):
        def inside(*a, **k):
            self.on = True
            try:
                return fn(*a, **k)
            finally:
                self.on = False
        return inside


@pytest.mark.parametrize("preset", ["shapes", "dvae-codebook", "aleph2image", "aleph2image-delta",
                                    "aleph2image-gamma", "vqgan-zquantize"])
def test_a_step_reads_the_device_once(preset, tiny_dvae, tiny_clip, monkeypatch, test_device):
    """On the test device (pytest --device cuda; the CPU by default)."""
    decoder = random_vqgan(TINY_VQ, seed=1) if "vqgan" in preset else copy.deepcopy(tiny_dvae)
    decoder, clip = decoder.to(test_device), copy.deepcopy(tiny_clip).to(test_device)
    cfg = get_preset(preset).replace(prompts=("a red circle",), size=32, cutn=3, steps=3, batch=2, device=test_device,
                                     decoder="test", clip="test")
    counter = ReadCounter(monkeypatch)
    optimise(cfg, decoder, clip)
    assert counter.to_host_calls == cfg.steps + 1  # loss, similarity and both finiteness checks in one copy
    assert set(counter.by_caller) <= HOST_SIDE, counter.by_caller  # no other read of a tensor on the hot path


def test_uniform_draws_are_each_runs_torch_rand_in_one_buffer():
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    again = [torch.Generator().manual_seed(s) for s in (3, 4)]
    for dtype in (torch.float32, torch.float64):
        u = uniform_draws((5, 7), gens, "cpu", dtype)
        assert u.shape == (2, 5, 7) and u.dtype == dtype
        for row, g in zip(u, again):
            assert torch.equal(row, torch.rand((5, 7), generator=g, dtype=dtype))
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, again))


def test_the_device_sampler_draws_the_categorical_distribution_from_one_uniform_per_position():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]).expand(2, 20_000, 5)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    codes = inverse_cdf_codes(probs, uniform_draws((20_000,), gens, "cpu", torch.float64))
    assert codes.shape == (2, 20_000) and int(codes.max()) <= 3  # a code of probability 0 never comes
    freq = torch.bincount(codes.flatten(), minlength=5).double() / codes.numel()
    p = probs[0, 0].double()
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / codes.numel()).sqrt() + 1e-12), freq
    same = inverse_cdf_codes(probs, uniform_draws((20_000,), [torch.Generator().manual_seed(1)], "cpu", torch.float64))
    assert torch.equal(same[0], codes[1])  # run 1's codes depend on its generator only
    # unnormalised weights are scaled by their total, as torch.multinomial does
    assert torch.equal(inverse_cdf_codes(3 * probs, uniform_draws((20_000,), [torch.Generator().manual_seed(0)] * 2,
                                                                   "cpu", torch.float64))[0], codes[0])


def test_the_cpu_keeps_torch_multinomial():
    probs = torch.rand(2, 50, 9).softmax(-1)
    codes = sample_codes(probs, [torch.Generator().manual_seed(s) for s in (5, 6)])
    want = [torch.multinomial(p, 1, generator=torch.Generator().manual_seed(s))[:, 0] for p, s in zip(probs, (5, 6))]
    assert torch.equal(codes, torch.stack(want))


def test_to_host_leaves_cpu_tensors_as_they_are():
    a, b = torch.arange(3), torch.ones(2)
    out = to_host(a, b)
    assert out[0] is a and out[1] is b


# ----------------------------------------------------------------------------- --compile

def compile_cfg(**kw):
    return get_preset("shapes").replace(**{"prompts": ("a red circle on a blue background",), "size": 64, "cutn": 4,
                                           "steps": 6, "device": "cpu", **kw})


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend (dynamo's graph capture and AOT autograd, no code generation):
    seconds instead of minutes on a CPU.  Records what was compiled."""
    import functools

    compiled = []
    real = torch.compile

    def compile_(fn, **kw):
        compiled.append(getattr(fn, "__name__", fn))
        return functools.partial(real, backend="aot_eager")(fn, **kw)

    monkeypatch.setattr(torch, "compile", compile_)
    return compiled


def test_compile_compiles_the_decoder_and_clip_and_keeps_the_arithmetic(shapes_models, aot_eager):
    decoder, clip = shapes_models
    eager = optimise(compile_cfg(), decoder, clip)
    fast = optimise(compile_cfg(compile=True), decoder, clip)
    assert sorted(aot_eager) == ["decode", "encode_image"]
    assert torch.equal(fast.images, eager.images) and torch.equal(fast.losses, eager.losses)


def test_a_compiled_run_resumes_bit_for_bit(shapes_models, aot_eager):
    decoder, clip = shapes_models
    cfg = compile_cfg(compile=True)
    whole = optimise(cfg, decoder, clip)
    part = optimise(cfg.replace(steps=3), decoder, clip)
    resumed = optimise(cfg, decoder, clip, resume_from=part.checkpoint)
    assert torch.equal(resumed.images, whole.images) and torch.equal(resumed.losses, whole.losses)


@pytest.mark.slow  # inductor generates and compiles C++ for the CPU: ~1.5 minutes on 2 cores
def test_compile_with_inductor_matches_eager_within_float_rounding(shapes_models):
    decoder, clip = shapes_models
    cfg = compile_cfg(steps=10)
    eager = optimise(cfg, decoder, clip)
    fast = optimise(cfg.replace(compile=True), decoder, clip)
    torch.testing.assert_close(fast.losses, eager.losses, rtol=1e-5, atol=1e-6)
    assert (fast.images - eager.images).abs().max() <= 1 / 255
