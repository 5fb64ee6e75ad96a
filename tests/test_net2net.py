"""taming Net2Net transformers as token priors: random tiny checkpoints in the published format (a taming
YAML + a Lightning .ckpt holding transformer.*, first_stage_model.* and cond_stage_model.* keys), checked
against minGPT's forward written out below from the tensors (taming's mingpt module cannot be imported)."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from test_vqgan import TINY, save_lightning, vq_params, write_yaml

from clipguide.engine.interfaces import TokenPrior
from clipguide.errors import ConfigError, UnsafePickleError, WeightsError
from clipguide.models.net2net import Net2NetPrior, load_net2net_prior
from clipguide.models.priors import load_prior
from clipguide.models.weights import sha256_file
from clipguide.testing import random_vqgan

torch.set_num_threads(1)

NET2NET = "taming.models.cond_transformer.Net2NetTransformer"
V, SIDE = TINY["n_embed"], 8  # the tiny first stage: 64 codes, 32 px / f=4 -> an 8x8 grid
GPT = {"vocab_size": V, "block_size": SIDE * SIDE + 1, "n_layer": 2, "n_head": 2, "n_embd": 16,
       "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0}
UNCONDITIONAL = {"cond_stage_config": "__is_unconditional__", "sos_token": 5}
CLASSES = {"cond_stage_key": "class_label",
           "cond_stage_config": {"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}}}


@pytest.fixture(scope="module")
def first_stage():
    """A tiny VQGAN's tensors under the Net2Net prefix (the prior never reads them; the format has them)."""
    return {f"first_stage_model.{k}": v for k, v in random_vqgan(TINY, seed=4).state_dict().items()}


def mingpt_state(vocab: int, block_size: int, n_layer: int, n_embd: int, seed: int = 0, **_) -> dict:
    """Random tensors under minGPT's keys, its causal mask buffers included."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    d = n_embd
    state = {"tok_emb.weight": rand(vocab, d, scale=1.0), "pos_emb": rand(1, block_size, d, scale=0.5)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        for norm in ("ln1", "ln2"):
            state.update({p + norm + ".weight": rand(d, scale=0.1, offset=1.0), p + norm + ".bias": rand(d, scale=0.1)})
        for linear in ("key", "query", "value", "proj"):
            state.update({p + f"attn.{linear}.weight": rand(d, d), p + f"attn.{linear}.bias": rand(d, scale=0.1)})
        state[p + "attn.mask"] = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        state.update({p + "mlp.0.weight": rand(4 * d, d), p + "mlp.0.bias": rand(4 * d, scale=0.1),
                      p + "mlp.2.weight": rand(d, 4 * d), p + "mlp.2.bias": rand(d, scale=0.1)})
    state.update({"ln_f.weight": rand(d, scale=0.1, offset=1.0), "ln_f.bias": rand(d, scale=0.1),
                  "head.weight": rand(vocab, d, scale=0.5)})
    return state


def net2net_files(tmp_path, first_stage, cond=UNCONDITIONAL, gpt=GPT, name="n2n", seed=0, extra=None, top=None):
    """A random tiny Net2Net transformer as a taming .yaml + Lightning .ckpt: (minGPT tensors, yaml, ckpt)."""
    first = {"target": "taming.models.vqgan.VQModel",
             "params": {**vq_params(TINY), "lossconfig": {"target": "taming.modules.losses.DummyLoss"}}}
    params = {"first_stage_key": "image", "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                                                                 "params": gpt},
              "first_stage_config": first, **cond, **(extra or {})}
    yaml = write_yaml(tmp_path / f"{name}.yaml", NET2NET, params)
    if top:  # top-level keys beside model: (taming reads only model, data and lightning)
        yaml.write_text(json.dumps({**json.loads(yaml.read_text()), **top}))
    state = mingpt_state(gpt["vocab_size"], gpt["block_size"], gpt["n_layer"], gpt["n_embd"], seed=seed)
    save_lightning({**{f"transformer.{k}": v for k, v in state.items()}, **first_stage}, tmp_path / f"{name}.ckpt")
    return state, yaml, tmp_path / f"{name}.ckpt"


def reference_logits(state: dict, idx: torch.Tensor, n_head: int) -> torch.Tensor:
    """minGPT's forward (taming.modules.transformer.mingpt.GPT, eval mode) on token indices [n, T]."""
    n, t = idx.shape
    x = state["tok_emb.weight"][idx] + state["pos_emb"][:, :t]
    d = x.shape[-1]
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    for i in layers:
        w = {k[len(f"blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (d,), w["ln1.weight"], w["ln1.bias"])
        k, q, v = (F.linear(h, w[f"attn.{m}.weight"], w[f"attn.{m}.bias"]).view(n, t, n_head, d // n_head).transpose(1, 2)
                   for m in ("key", "query", "value"))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(w["attn.mask"][:, :, :t, :t] == 0, float("-inf")).softmax(-1)
        x = x + F.linear((att @ v).transpose(1, 2).reshape(n, t, d), w["attn.proj.weight"], w["attn.proj.bias"])
        h = F.layer_norm(x, (d,), w["ln2.weight"], w["ln2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, w["mlp.0.weight"], w["mlp.0.bias"])), w["mlp.2.weight"], w["mlp.2.bias"])
    return F.linear(F.layer_norm(x, (d,), state["ln_f.weight"], state["ln_f.bias"]), state["head.weight"])


def reference_log_prob(state: dict, condition: int, codes: torch.Tensor, n_head: int) -> torch.Tensor:
    """Net2NetTransformer.forward's logits for codes [n, h, w] after one condition token, over the first V codes."""
    z = codes.flatten(1)
    cz = torch.cat([torch.full((len(z), 1), condition), z], 1)
    logits = reference_logits(state, cz[:, :-1], n_head)[..., :V]  # output i predicts code i
    return logits.log_softmax(-1).gather(-1, z[..., None])[..., 0].sum(1)


def reference_sample(state: dict, condition: int, n: int, generator: torch.Generator, n_head: int) -> torch.Tensor:
    """taming's sampling loop (full recompute, temperature 1, no top-k), drawing from ``generator``."""
    x = torch.full((n, 1), condition)
    for _ in range(SIDE * SIDE):
        probs = reference_logits(state, x, n_head)[:, -1, :V].softmax(-1)
        x = torch.cat([x, torch.multinomial(probs, 1, generator=generator)], 1)
    return x[:, 1:].view(n, SIDE, SIDE)


def codes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (n, SIDE, SIDE), generator=torch.Generator().manual_seed(seed))


def one_line_error(kind, fn, *args, **kwargs) -> str:
    with pytest.raises(kind) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("vocab", [V, V + 8], ids=["same-vocab", "larger-gpt-vocab"])
def test_log_prob_matches_mingpt_and_describe(tmp_path, first_stage, vocab):
    before = set(sys.modules)
    state, yaml, ckpt = net2net_files(tmp_path, first_stage, gpt={**GPT, "vocab_size": vocab})
    prior = load_net2net_prior(str(yaml))
    imported = set(sys.modules) - before
    assert not {m for m in imported if "lightning" in m or m.startswith(("taming.models", "taming.modules.transformer"))}
    assert isinstance(prior, TokenPrior) and isinstance(prior, Net2NetPrior)
    assert prior.vocab_size == V and prior.grid == (SIDE, SIDE)
    x = codes(3, seed=1)
    with torch.no_grad():
        assert torch.allclose(prior.log_prob(x), reference_log_prob(state, 5, x, GPT["n_head"]), atol=1e-5, rtol=1e-6)
        one_hot = F.one_hot(x.flatten(1), V).float()  # the logits themselves, position by position
        cz = torch.cat([torch.full((3, 1), 5), x.flatten(1)[:, :-1]], 1)
        logits = prior.model(prior.model.embed(one_hot))
        assert torch.allclose(logits, reference_logits(state, cz, GPT["n_head"])[..., :V], atol=1e-5, rtol=1e-5)
    record = prior.describe()
    assert record["name"] == "n2n" and record["sha256"] == sha256_file(ckpt) and len(record["sha256"]) == 64
    assert (record["vocab_size"], record["grid"]) == (V, [SIDE, SIDE])
    assert record["conditioning"] == {"kind": "sos", "token": 5} and f"vocab {vocab}" in record["architecture"]
    json.dumps(record)  # goes into the run's record


def test_sample_is_mingpt_sampling_from_the_generator(tmp_path, first_stage):
    state, yaml, _ = net2net_files(tmp_path, first_stage, gpt={**GPT, "vocab_size": V + 8})
    prior = load_net2net_prior(f"{yaml}:{tmp_path / 'n2n.ckpt'}")
    torch.manual_seed(123)
    a = prior.sample(2, torch.Generator().manual_seed(7))
    torch.manual_seed(456)  # the global RNG plays no part
    b = prior.sample(2, torch.Generator().manual_seed(7))
    assert a.shape == (2, SIDE, SIDE) and a.dtype == torch.int64
    assert 0 <= int(a.min()) and int(a.max()) < V, "only the decoder's codes, though the GPT has 8 more tokens"
    assert torch.equal(a, b)
    assert not torch.equal(a, prior.sample(2, torch.Generator().manual_seed(8)))
    with torch.no_grad():  # the key/value cache draws what full recomputation draws, from the same stream
        assert torch.equal(a, reference_sample(state, 5, 2, torch.Generator().manual_seed(7), GPT["n_head"]))
    kept = SIDE * SIDE // 2  # completions (--prior-resample): the first half given, the rest drawn
    c = prior.sample(2, torch.Generator().manual_seed(9), prefix=a.flatten(1)[:, :kept])
    assert torch.equal(c.flatten(1)[:, :kept], a.flatten(1)[:, :kept]) and not torch.equal(c, a)


def test_soft_weights_one_hot_equals_tokens_and_is_differentiable(tmp_path, first_stage):
    _, yaml, _ = net2net_files(tmp_path, first_stage)
    prior = load_prior(str(yaml))  # the registry's dispatch of a .yaml spec
    assert isinstance(prior, Net2NetPrior)
    x = codes(2, seed=3)
    one_hot = F.one_hot(x, V).permute(0, 3, 1, 2).float()
    assert torch.allclose(prior.log_prob(one_hot), prior.log_prob(x), atol=1e-5, rtol=0)
    logits = torch.randn(2, V, SIDE, SIDE, generator=torch.Generator().manual_seed(4)).requires_grad_()
    lp = prior.log_prob(logits.softmax(1))
    lp.sum().backward()
    assert lp.shape == (2,) and torch.isfinite(lp).all()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in prior.model.parameters())


def test_class_conditional_needs_a_class_and_samples_by_class(tmp_path, first_stage):
    state, yaml, ckpt = net2net_files(tmp_path, first_stage, cond=CLASSES, name="cin")
    msg = one_line_error(ConfigError, load_net2net_prior, str(yaml))
    assert "class-conditional" in msg and "class_label=K" in msg and "0..9" in msg
    assert "0..9" in one_line_error(ConfigError, load_net2net_prior, str(yaml), class_label=10)
    priors = {k: load_net2net_prior(str(yaml), class_label=k) for k in (3, 7)}
    x = codes(2, seed=5)
    with torch.no_grad():
        for k, prior in priors.items():
            assert torch.allclose(prior.log_prob(x), reference_log_prob(state, k, x, GPT["n_head"]), atol=1e-5, rtol=1e-6)
            assert prior.describe()["conditioning"] == {"kind": "class_label", "class": k}
            assert prior.describe()["sha256"] == sha256_file(ckpt)
    g = lambda: torch.Generator().manual_seed(11)  # the same stream for both classes
    assert not torch.equal(priors[3].sample(2, g()), priors[7].sample(2, g()))
    _, plain, _ = net2net_files(tmp_path, first_stage, name="uncond")
    assert "drop class_label" in one_line_error(ConfigError, load_net2net_prior, str(plain), class_label=3)


def test_grid_stated_in_the_config(tmp_path, first_stage):
    _, yaml, _ = net2net_files(tmp_path, first_stage, top={"grid": [4, 6]})
    prior = load_net2net_prior(str(yaml))
    assert prior.grid == (4, 6) and prior.sample(1, torch.Generator().manual_seed(0)).shape == (1, 4, 6)
    _, yaml, _ = net2net_files(tmp_path, first_stage, top={"grid": [9, 9]}, name="big")
    assert "block_size 65 is below the 81 positions" in one_line_error(ConfigError, load_net2net_prior, str(yaml))


@pytest.mark.parametrize("extra,match", [
    ({"permuter_config": {"target": "taming.modules.transformer.permuter.Subsample", "params": {"H": 8, "W": 8}}},
     "permuter Subsample.*Identity \\(raster order\\) only"),
    ({"cond_stage_key": "depth", "cond_stage_config": {"target": "taming.models.vqgan.VQModel", "params": {}}},
     "conditions on depth \\(taming.models.vqgan.VQModel\\).*unconditional .*class-conditional"),
    ({"cond_stage_key": "segmentation", "cond_stage_config": {"target": "taming.models.vqgan.VQModel"}},
     "conditions on segmentation.*supports unconditional"),
    ({"cond_stage_key": "coord", "cond_stage_config": {"target": "taming.modules.misc.coord.CoordStage"}},
     "conditions on coord"),
    ({"cond_stage_config": "__is_first_stage__"}, "__is_first_stage__.*supports unconditional"),
    ({"transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": {**GPT, "n_unmasked": 4}}},
     "n_unmasked 4"),
    ({"transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": {**GPT, "vocab_size": 32}}},
     "vocab_size 32 is below the first stage's n_embed 64"),
], ids=["permuter", "depth", "segmentation", "coord", "first-stage", "n_unmasked", "small-vocab"])
def test_unsupported_models_are_one_line_errors(tmp_path, first_stage, extra, match):
    cond = {} if "cond_stage_key" in extra or "cond_stage_config" in extra else UNCONDITIONAL
    _, yaml, _ = net2net_files(tmp_path, first_stage, cond=cond, extra=extra)
    assert re.search(match, one_line_error(ConfigError, load_net2net_prior, str(yaml)))


def test_a_vqgan_config_is_not_a_prior(tmp_path):
    yaml = write_yaml(tmp_path / "vq.yaml", "taming.models.vqgan.VQModel", vq_params(TINY))
    assert "not a taming Net2NetTransformer" in one_line_error(ConfigError, load_prior, str(yaml))


def test_checkpoint_keys_are_checked_strictly(tmp_path, first_stage):
    state, yaml, ckpt = net2net_files(tmp_path, first_stage)
    full = {**{f"transformer.{k}": v for k, v in state.items()}, **first_stage}

    def refit(**change):
        save_lightning({k: v for k, v in {**full, **change}.items() if v is not None}, ckpt)
        return load_net2net_prior(str(yaml))

    msg = one_line_error(WeightsError, refit, **{"transformer.blocks.1.attn.key.weight": None})
    assert "1 missing key(s) (transformer.blocks.1.attn.key.weight)" in msg and "n2n.ckpt" in msg
    msg = one_line_error(WeightsError, refit, **{"transformer.blocks.2.ln1.weight": torch.ones(16)})
    assert "1 unexpected key(s) (transformer.blocks.2.ln1.weight)" in msg
    msg = one_line_error(WeightsError, refit, **{"transformer.head.weight": torch.ones(V + 1, 16)})
    assert "of another shape" in msg and "transformer.head.weight [65, 16] vs [64, 16]" in msg
    full_mask = torch.ones(1, 1, GPT["block_size"], GPT["block_size"])
    assert "not minGPT's causal mask" in one_line_error(WeightsError, refit, **{"transformer.blocks.0.attn.mask": full_mask})
    # The masks are minGPT buffers derived from the config: a checkpoint without them still loads.
    masks = {f"transformer.blocks.{i}.attn.mask": None for i in range(GPT["n_layer"])}
    assert refit(**masks).vocab_size == V


def test_malicious_checkpoint_is_refused(tmp_path, first_stage):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state, yaml, ckpt = net2net_files(tmp_path, first_stage)
    torch.save({"state_dict": {f"transformer.{k}": v for k, v in state.items()}, "hyper_parameters": Payload()}, ckpt)
    with pytest.raises(UnsafePickleError, match="io.open"):
        load_prior(str(yaml))
    assert not marker.exists()


def test_the_prior_spec_takes_the_class_after_a_hash(tmp_path, first_stage):
    from clipguide.models.priors import load_prior

    _, yaml, _ = net2net_files(tmp_path, first_stage, cond=CLASSES, name="cin")
    assert load_prior(f"{yaml}#7").describe()["conditioning"] == {"kind": "class_label", "class": 7}
    assert "class_label=K" in one_line_error(ConfigError, load_prior, str(yaml))
