"""Scores: the CLIP score's formula and prompt handling, the Fréchet distance against closed-form
cases, both on shapes scenes, in the manifest, and from the CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipguide import clip_frechet_distance, clip_score
from clipguide.audit import scores as SC
from clipguide.audit.classification import image_features
from clipguide.cli import main
from clipguide.errors import ConfigError

RED_CIRCLE = "a red circle on a blue background"


def test_clip_score_is_100_times_the_clamped_cosine(shapes_models, render_scenes):
    clip = shapes_models[1]
    images, _ = render_scenes(6, seed=11, colour="red", shape="circle", background="blue")
    cos = image_features(clip, images) @ F.normalize(clip.encode_text([RED_CIRCLE]), dim=-1).T[:, 0]
    per = SC.clip_scores(images, RED_CIRCLE, clip)
    assert per == pytest.approx((100 * cos.clamp(min=0)).tolist(), abs=1e-4)
    assert clip_score(images, RED_CIRCLE, clip) == pytest.approx(float(np.mean(per)))
    # a negative or image target has no caption: only the pulling text targets count
    assert SC.clip_scores(images, RED_CIRCLE + " | blue:-0.5", clip) == pytest.approx(per)
    assert SC.clip_scores(images[:1], "noise:3", clip) == [None]


def test_clip_score_prefers_the_matching_prompt(shapes_models, render_scenes):
    clip = shapes_models[1]
    red, _ = render_scenes(10, seed=12, colour="red", shape="circle", background="blue")
    assert clip_score(red, RED_CIRCLE, clip) > clip_score(red, "a green square on a white background", clip) + 10


def test_frechet_distance_closed_forms():
    g = np.random.default_rng(0)
    a = g.normal(size=(50, 4)) @ g.normal(size=(4, 4))
    assert SC.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5, 3.0])
    assert SC.frechet_distance(a, a + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)
    # b = 2a + c: cov_b = 4 cov_a, so Tr(S + 4S - 2·2S) = Tr(S)
    b = 2 * a + shift
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert SC.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    assert SC.frechet_distance(a, b) == pytest.approx(SC.frechet_distance(b, a), rel=1e-6)
    with pytest.raises(ConfigError, match="at least 2"):
        SC.frechet_distance(a[:1], a)


def test_clip_frechet_distance_separates_distributions(shapes_models, render_scenes):
    clip = shapes_models[1]
    red_a, _ = render_scenes(40, seed=13, colour="red", shape="circle")
    red_b, _ = render_scenes(40, seed=14, colour="red", shape="circle")
    green, _ = render_scenes(40, seed=15, colour="green", shape="square")
    same, other = clip_frechet_distance(red_a, red_b, clip), clip_frechet_distance(red_a, green, clip)
    assert 0 <= same < 0.25 * other, (same, other)


def test_snapshotter_records_clip_scores(shapes_models, render_scenes, write_run):
    images, _ = render_scenes(2, seed=16, colour="red", shape="circle", background="blue")
    prompts = [RED_CIRCLE, "a green square on a white background"]
    run_dir, saver = write_run(images, prompts, scorer=shapes_models[1])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    want = SC.clip_scores(images, prompts, shapes_models[1])
    assert [s["clip_score"] for s in manifest["snapshots"]] == pytest.approx(want)
    scores = manifest["scores"]
    assert scores["scorer"]["name"] == "shapes" and "Hessel" in scores["formula"]
    assert [r["clip_score"] for r in scores["clip_score"]] == pytest.approx(want) and want[0] > want[1]


def test_score_cli_reports_and_records(shapes_models, render_scenes, write_run, tmp_path, capsys):
    images, _ = render_scenes(3, seed=17, colour="red", shape="circle", background="blue")
    run_dir, _ = write_run(images, [RED_CIRCLE, "a red circle", "red"])
    ref = tmp_path / "ref"
    ref.mkdir()
    from clipguide.records.files import to_pil

    for i, x in enumerate(render_scenes(4, seed=18)[0]):
        to_pil(x).save(ref / f"{i}.png")
    assert main(["score", str(run_dir), "--against", str(ref), "--record", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in record["clip_score"]] == [RED_CIRCLE, "a red circle", "red"]
    assert record["frechet"]["images"] == 3 and record["frechet"]["reference_images"] == 4
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["scores"]["records"][0]["frechet"]["distance"] == pytest.approx(record["frechet"]["distance"])
    assert main(["score", str(ref), "--prompt", RED_CIRCLE]) == 0
    assert "mean CLIP score" in capsys.readouterr().out
    assert main(["score", str(ref), "--record"]) == 2
    assert "--record" in capsys.readouterr().err


def test_score_needs_a_prompt():
    with pytest.raises(ConfigError, match="no image has a text prompt"):
        clip_score(torch.zeros(1, 3, 8, 8), None, "shapes")
