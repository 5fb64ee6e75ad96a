"""Behaviour of the default recipe on the shipped shapes world, judged on pixels (no CLIP)."""

import torch

from clipguide import get_preset, optimise
from clipguide.shapes import judge as J

PAIRS = [
    ("a red circle on a blue background", ("red", "circle", "blue")),
    ("a yellow square on a black background", ("yellow", "square", "black")),
    ("a white triangle on a green background", ("white", "triangle", "green")),
    ("a blue square on an orange background", ("blue", "square", "orange")),
]


def colour_and_background_rate(images, targets):
    hits = [v.colour == c and v.background == b for v, (c, _, b) in zip(J.judge_batch(images), targets)]
    return sum(hits) / len(hits)


def test_short_default_run_moves_judged_attributes_toward_the_prompt(shapes_models):
    decoder, clip = shapes_models
    cfg = get_preset("shapes").replace(prompts=tuple(p for p, _ in PAIRS), steps=60, snapshots=(0,))
    r = optimise(cfg, decoder, clip)
    targets = [t for _, t in PAIRS]
    before, after = colour_and_background_rate(r.snapshots[0], targets), colour_and_background_rate(r.images, targets)
    assert after >= 0.75 and after > before, (before, after, [v.attributes for v in J.judge_batch(r.images)])


def test_quality_benchmark_reports_the_judge_and_the_cause_of_each_miss(tmp_path, capsys):
    """benchmarks/shapes_quality.py on two held-out prompts for 3 steps: its json holds the judge's rates and one
    cause ("search" or "clip") per missed run, and it prints both; ``--fit`` adds the search-space check's rate."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes_quality.py"
    out = tmp_path / "q.json"
    argv = sys.argv
    sys.argv = [str(script), "--prompts", "2", "--steps", "3", "--threads", "1", "--presets", "shapes", "--fit", "--json", str(out)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    (row,) = json.loads(out.read_text())["rows"]
    misses = round(2 * (1 - row["match_all"]))
    assert sum(row["miss_causes"].values()) == misses and len(row["gaps"]) == 2, row
    assert 0.0 <= row["fit_match_all"] <= 1.0 and len(row["fit_gaps"]) == 2, row
    assert 0 <= row["misses_at_or_above_fit"] <= misses, row
    assert len(row["verdicts"]) == 2 and all(len(v) == 3 for v in row["verdicts"]), row  # per run: misses by shape
    printed = capsys.readouterr().out
    assert "misses by cause" in printed and "without CLIP" in printed


def test_an_ensemble_of_one_clip_with_itself_guides_like_that_clip(shapes_models):
    """The ensemble's score is the mean of its members' cosines: twice the same CLIP is that CLIP."""
    from clipguide.models.clip import load_clip

    cfg = get_preset("shapes").replace(prompts=("a red circle on a blue background",), steps=4)
    decoder, single = shapes_models
    one = optimise(cfg, decoder, single)
    two = optimise(cfg, decoder, load_clip("shapes+shapes"))
    torch.testing.assert_close(two.similarities, one.similarities, atol=2e-5, rtol=0)


def test_the_default_latent_can_draw_true_renders_without_clip(shapes_models):
    """The benchmark's search-space check (``--fit``): the default recipe's latent and coarse-to-fine schedule, pulled
    toward one true render per prompt by pixel MSE, draws scenes the judge accepts; two steps from the flat start
    draw nothing it accepts."""
    from clipguide.shapes.quality import fit_renders

    decoder, _ = shapes_models
    cfg = get_preset("shapes").replace(steps=100, pyramid_every=25)
    pairs = PAIRS[:2]
    fit = fit_renders(cfg, decoder, pairs)
    assert fit["match_all"] == 1.0, (fit["shape_failures"], [v.attributes for v in J.judge_batch(fit["images"])])
    assert fit["images"].shape == fit["targets"].shape == (2, 3, 128, 128)
    assert fit_renders(cfg.replace(steps=2), decoder, pairs)["match_all"] == 0.0


def test_the_search_space_check_decodes_z_latents_through_the_z_path():
    """``--fit`` on a z+quantize recipe decodes its VQGAN latent z as the loop does, not as code weights."""
    from clipguide import load_decoder
    from clipguide.shapes.quality import fit_renders

    cfg = get_preset("vqgan-zquantize").replace(decoder="shapes-vqgan", clip="shapes", size=128, steps=2)
    fit = fit_renders(cfg, load_decoder("shapes-vqgan"), PAIRS[:1])
    assert fit["images"].shape == (1, 3, 128, 128) and 0.0 <= fit["match_all"] <= 1.0
