"""CLIP loading through open_clip: spec forms, QuickGELU for OpenAI tags, offline behaviour,
refusal of code-carrying checkpoints, and the Clip encode paths.

Real architectures with random weights; no network (an unreachable server is simulated).
"""

from __future__ import annotations

import json
import time

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from clipguide.models import clip, weights
from clipguide.errors import ConfigError, UnsafePickleError, WeightsError

torch.set_num_threads(1)

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    "quick_gelu": True,
}
TINY_MEAN, TINY_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _seeded(build, seed=0):
    """open_clip initialises from the global RNG: seed it without leaking the state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def _activations(model) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}


def _assert_one_line(err, *parts):
    msg = str(err.value)
    assert "\n" not in msg
    for part in parts:
        assert str(part) in msg, (part, msg)


@pytest.fixture(scope="module")
def vit_b32():
    """open_clip's ViT-B-32 as open_clip builds it by default (nn.GELU), random weights."""
    return _seeded(lambda: open_clip.create_model("ViT-B-32")).eval().requires_grad_(False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPGUIDE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_json(tmp_path):
    """An architecture of our own in the shipped format: .json + sibling .safetensors."""
    model = _seeded(lambda: open_clip.CLIP(**TINY_CFG)).eval().requires_grad_(False)
    save_file(model.state_dict(), tmp_path / "tiny-clip.safetensors")
    info = {"kind": "open_clip", "model_name": "tiny-vit", "model_cfg": TINY_CFG, "mean": TINY_MEAN, "std": TINY_STD}
    (tmp_path / "tiny-clip.json").write_text(json.dumps(info))
    return model, tmp_path / "tiny-clip.json"


@pytest.fixture
def tiny(tiny_json):
    return clip.load_clip(str(tiny_json[1]))


# --- spec resolution --------------------------------------------------------------------------


@pytest.mark.parametrize("tag, quick", [("openai", True), ("laion2b_s34b_b79k", False)])
def test_openai_tag_builds_quickgelu(tag, quick):
    """open_clip 3.x only warns when the OpenAI tag meets nn.GELU; the loader must switch."""
    spec = clip.parse_clip_spec(f"ViT-B-32/{tag}")
    assert spec.quick_gelu is quick
    model = _seeded(lambda: clip.build_clip_model(spec))  # what load_clip builds before loading weights
    assert _activations(model) == ({QuickGELU} if quick else {torch.nn.GELU})


def test_open_clip_alone_would_use_gelu(vit_b32):
    """The pitfall the loader guards against: the plain name builds nn.GELU."""
    assert _activations(vit_b32) == {torch.nn.GELU}


def test_pretrained_spec_takes_the_tags_normalisation():
    spec = clip.parse_clip_spec("ViT-B-16/laion2b_s34b_b88k")
    assert (spec.model_name, spec.tag, spec.path) == ("ViT-B-16", "laion2b_s34b_b88k", None)
    assert spec.mean == open_clip.OPENAI_DATASET_MEAN and spec.std == open_clip.OPENAI_DATASET_STD
    assert clip.parse_clip_spec("ViT-B-32/OpenAI").tag == "openai"


@pytest.mark.parametrize("spec, suggestion", [("ViT-B-33/openai", "ViT-B-32"), ("ViT-B-32/opnai", "openai"),
                                              ("ViT-B-32", "ViT-B-32/TAG")])
def test_unknown_names_suggest_close_matches(spec, suggestion):
    with pytest.raises(ConfigError) as err:
        clip.parse_clip_spec(spec)
    _assert_one_line(err, suggestion)


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError) as err:
        clip.load_clip(f"ViT-B-32/{tmp_path / 'nope.pt'}")
    _assert_one_line(err, tmp_path / "nope.pt")


def test_list_clip_models():
    models = clip.list_clip_models()
    assert ("ViT-B-32", "openai") in models and ("ViT-B-16", "laion2b_s34b_b88k") in models


# --- weights ---------------------------------------------------------------------------------


def test_local_checkpoint_matches_original(vit_b32, tmp_path):
    path = tmp_path / "vit-b-32.pt"
    torch.save(vit_b32.state_dict(), path)
    loaded = clip.load_clip(f"ViT-B-32/{path}")
    assert (loaded.image_size, loaded.embed_dim, loaded.sha256) == (224, 512, weights.sha256_file(path))
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    normalised = (images - loaded.mean) / loaded.std
    torch.testing.assert_close(loaded.encode_image(images), vit_b32.encode_image(normalised))
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a red square"])
    torch.testing.assert_close(loaded.encode_text(["a red square"]), vit_b32.encode_text(tokens))


def test_cached_pretrained_tag_loads_offline(vit_b32, cache, monkeypatch):
    """A tag already in the cache (Hugging Face layout) loads without any network access."""
    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")
    folder = cache / "open_clip" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(vit_b32.state_dict(), folder / "snapshots" / ("0" * 40) / "open_clip_model.safetensors")
    monkeypatch.setattr(weights, "is_reachable", lambda *a, **k: pytest.fail("network probed for a cached file"))
    loaded = clip.load_clip("ViT-B-32/openai")
    assert _activations(loaded.model) == {QuickGELU}
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), vit_b32.state_dict().values()))


def test_offline_pretrained_fails_fast_on_one_line(cache, monkeypatch):
    monkeypatch.setattr(weights, "is_reachable", lambda *a, **k: False)  # offline, even on a connected machine
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        clip.load_clip("ViT-B-32/openai")
    assert time.monotonic() - start < 5
    _assert_one_line(err, "ViT-B-32/openai", cache / "open_clip")


def test_malicious_checkpoint_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {"visual.proj": torch.zeros(1)}, "hook": Payload()}, path)
    with pytest.raises(UnsafePickleError) as err:
        clip.load_clip(f"ViT-B-32/{path}")
    _assert_one_line(err, path, "io.open")
    assert not marker.exists()


def test_own_config_json(tiny_json, tiny):
    model, path = tiny_json
    assert (tiny.image_size, tiny.embed_dim, tiny.tokenizer.context_length) == (32, 32, 16)
    assert tiny.sha256 == weights.sha256_file(path.with_suffix(".safetensors"))
    assert _activations(tiny.model) == {QuickGELU}
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(TINY_MEAN).view(1, 3, 1, 1), torch.tensor(TINY_STD).view(1, 3, 1, 1)
    expected = model.encode_image((images - mean) / std)
    torch.testing.assert_close(tiny.encode_image(images), expected)


def test_own_config_fp16_weights(tiny_json):
    """The shipped shapes CLIP stores fp16 tensors; they load into the fp32 model."""
    model, path = tiny_json
    save_file({k: v.half() for k, v in model.state_dict().items()}, path.with_suffix(".safetensors"))
    loaded = clip.load_clip(str(path))
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = clip.Clip(model, loaded.tokenizer, name="ref", embed_dim=32, mean=TINY_MEAN, std=TINY_STD)
    torch.testing.assert_close(loaded.encode_image(images), reference.encode_image(images), atol=2e-2, rtol=2e-2)


def test_shapes_spec_uses_the_shipped_file(tiny_json, tmp_path, monkeypatch):
    monkeypatch.setattr(clip, "SHAPES_CLIP", tiny_json[1])
    assert clip.load_clip("shapes").embed_dim == 32
    monkeypatch.setattr(clip, "SHAPES_CLIP", tmp_path / "absent.json")
    with pytest.raises(WeightsError) as err:
        clip.load_clip("shapes")
    _assert_one_line(err, "absent.json", "train-shapes")


def test_config_weights_that_do_not_fit(tiny_json):
    info = json.loads(tiny_json[1].read_text())
    info["model_cfg"] = {**TINY_CFG, "embed_dim": 48}
    tiny_json[1].write_text(json.dumps(info))
    with pytest.raises(WeightsError) as err:
        clip.load_clip(str(tiny_json[1]))
    _assert_one_line(err, "tiny-clip.safetensors", "tiny-vit")


# --- encode paths -------------------------------------------------------------------------------


def test_encode_text_encodes_each_prompt_once(tiny, monkeypatch):
    seen = []
    encode = tiny.model.encode_text
    monkeypatch.setattr(tiny.model, "encode_text", lambda tokens: seen.append(len(tokens)) or encode(tokens))
    first = tiny.encode_text(["a red circle", "a blue square", "a red circle"])
    assert first.shape == (3, 32) and first.dtype == torch.float32 and not first.requires_grad
    assert torch.equal(first[0], first[2])
    again = tiny.encode_text(["a blue square", "a green star"])
    # one text per call: a text's embedding must not depend on which texts shared its batch
    assert seen == [1, 1, 1] and torch.equal(again[0], first[1])
    assert torch.equal(again[1], tiny.model.encode_text(tiny.tokenizer(["a green star"])).float()[0])
    assert tiny.encode_text([]).shape == (0, 32)


def test_encode_image_is_differentiable_and_resizes(tiny):
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0), requires_grad=True)
    embeddings = tiny.encode_image(images)
    assert embeddings.shape == (2, 32) and embeddings.dtype == torch.float32
    embeddings.square().sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.model.parameters())
    resized = torch.nn.functional.interpolate(images.detach(), size=(32, 32), mode="bicubic", align_corners=False)
    torch.testing.assert_close(embeddings.detach(), tiny.encode_image(resized))


def test_to_moves_the_cache(tiny, test_device):
    tiny.encode_text(["x"])
    assert tiny.to(test_device) is tiny and tiny.encode_text(["x"]).device.type == torch.device(test_device).type


# --- ensembles --------------------------------------------------------------------------------


def test_ensemble_scores_the_mean_of_its_members_cosines(tiny_json, tiny):
    shapes = clip.load_clip("shapes")
    both = clip.load_clip(f"{tiny_json[1]}+shapes")
    assert isinstance(both, clip.ClipEnsemble) and both.name == f"{tiny_json[1]}+shapes"
    assert (both.embed_dim, both.image_size) == (32 + 128, 64)  # cutouts at the larger input; tiny resizes down
    assert both.sha256 == f"{tiny.sha256}+{shapes.sha256}"
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    texts = ["a red circle on a blue background", "a green star"]
    cos = both.encode_image(images) @ both.encode_text(texts).T

    def cosines(member):
        return torch.nn.functional.normalize(member.encode_image(images), dim=-1) @ \
            torch.nn.functional.normalize(member.encode_text(texts), dim=-1).T

    torch.testing.assert_close(cos, (cosines(tiny) + cosines(shapes)) / 2)
    cos.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert both.cast(torch.float32) is both and both.encode_text([]).shape == (0, 160)


def test_ensemble_spec_with_an_empty_member_names_the_fix():
    with pytest.raises(ConfigError) as err:
        clip.load_clip("shapes+")
    _assert_one_line(err, "'shapes+'", "empty member", "shapes+ViT-B-32/openai")


def test_a_path_with_a_plus_is_one_clip(tiny_json, tmp_path):
    odd = tmp_path / "a+b"
    odd.mkdir()
    for suffix in (".json", ".safetensors"):
        (odd / f"tiny{suffix}").write_bytes(tiny_json[1].with_suffix(suffix).read_bytes())
    assert isinstance(clip.load_clip(str(odd / "tiny.json")), clip.Clip)


def test_audits_refuse_an_ensemble_and_name_a_member():
    from clipguide.audit.classification import resolve_clip

    with pytest.raises(ConfigError) as err:
        resolve_clip("shapes+shapes")
    _assert_one_line(err, "ensemble shapes+shapes", "--filter-clip shapes")
