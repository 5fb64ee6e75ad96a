"""The output filter on the shapes world: a calibrated "red" filter flags red scenes and passes the
rest; snapshots are blurred or withheld as they are written, the manifest records it, the contact
sheet never shows an unblurred flagged image, and originals are kept only with keep_flagged."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from clipguide import OutputFilter
from clipguide.audit import output_filter as OF
from clipguide.cli import main
from clipguide.errors import ConfigError
from clipguide.records.files import read_png_text, to_pil


@pytest.fixture(scope="module")
def red_calibration(shapes_models):
    """'red' calibrated on 100 + 100 scenes, measured on 100 + 100 fresh ones."""
    return OF.calibrate(shapes_models[1], "red", *OF.shapes_sets("red", 100, seed=0),
                        held_out=OF.shapes_sets("red", 100, seed=1000))


def test_calibrated_red_filter_flags_red_scenes_and_passes_the_rest(red_calibration):
    cal = red_calibration
    assert cal.method == "equal-error" and len(cal.positives) == len(cal.negatives) == 100
    assert (cal.tpr, cal.fpr) == OF.rates(cal.positives, cal.negatives, cal.threshold)
    held = cal.held_out
    # measured: TPR 0.89, FPR 0.11 (n = 100 each; 0.900 / 0.140 with n = 200); with the CLIP before its clipprior
    # stage 0.97 / 0.03 (0.960 / 0.065): "red" alone was never a training caption, and a fine-tune moves it
    assert held["tpr"] >= 0.85 and held["fpr"] <= 0.15, held
    roc = cal.roc()
    assert roc[0][1:] == (1.0, 1.0) and all(a[1] >= b[1] and a[2] >= b[2] for a, b in zip(roc, roc[1:]))


def test_filter_check_decides_per_image(shapes_models, red_calibration, render_scenes):
    red, _ = render_scenes(20, seed=50, colour="red")
    other, scenes = render_scenes(60, seed=51)
    other = other[[s.colour != "red" and s.background != "red" for s in scenes]]
    flt = OutputFilter(shapes_models[1], {"red": red_calibration.threshold})
    decisions = flt.check(torch.cat([red, other]))
    flagged = [d.is_flagged for d in decisions]
    assert sum(flagged[:20]) >= 18 and sum(flagged[20:]) <= 0.1 * len(other)
    for d, s in zip(decisions, flt.scores(torch.cat([red, other]))[:, 0].tolist()):
        assert d.scores["red"] == pytest.approx(s) and d.action == ("blur" if s >= red_calibration.threshold else "pass")


def images_on_disk(run_dir, n):
    return [np.asarray(Image.open(run_dir / f"run_{i:02d}" / "step_000005.png")) for i in range(n)]


@pytest.mark.parametrize("action, keep", [("blur", True), ("withhold", False)])
def test_snapshots_are_screened_as_they_are_written(shapes_models, render_scenes, write_run, action, keep):
    red, _ = render_scenes(2, seed=60, colour="red", shape="circle", background="blue")
    green, _ = render_scenes(2, seed=61, colour="green", shape="square", background="white")
    images = torch.cat([red, green])
    flt = OutputFilter(shapes_models[1], {"red": 0.3}, action=action, keep_flagged=keep)
    want = [d.is_flagged for d in flt.check(images)]
    assert want == [True, True, False, False]  # the scenes are clear-cut
    run_dir, saver = write_run(images, ["p0", "p1", "p2", "p3"], output_filter=flt)
    saver.finish(SimpleNamespace(steps_done=5, interrupted=False, models=saver.manifest["models"], config=saver.config))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["filter"]["concepts"] == {"red": 0.3} and manifest["filter"]["action"] == action
    entries = manifest["snapshots"]
    assert [e["filter"]["flagged"] for e in entries] == want
    assert [e["filter"]["action"] for e in entries] == [action, action, "pass", "pass"]
    originals = [np.asarray(to_pil(x)) for x in images]
    saved = images_on_disk(run_dir, 4)
    for i in range(4):
        assert np.array_equal(saved[i], originals[i]) != want[i]
        assert read_png_text(run_dir / entries[i]["file"])["clipguide"]["filter"]["flagged"] == want[i]
    if action == "withhold":
        assert (saved[0] == OF.PLACEHOLDER).mean() > 0.9
    flagged_dir = run_dir / "flagged"
    assert flagged_dir.is_dir() == keep
    if keep:
        assert sorted(p.relative_to(flagged_dir).as_posix() for p in flagged_dir.rglob("*.png")) == \
            ["run_00/step_000005.png", "run_01/step_000005.png"]
        assert np.array_equal(np.asarray(Image.open(flagged_dir / entries[0]["filter"]["original"].split("/", 1)[1])), originals[0])
    sheet = np.asarray(Image.open(run_dir / "contact_sheet.png"))
    for i in range(4):  # one row per run: its label and the step labels, 14 px each, then the image
        cell = sheet[i * (14 + 14 + 128) + 28:(i + 1) * (14 + 14 + 128), :128]
        assert np.array_equal(cell, saved[i]) and np.array_equal(cell, originals[i]) != want[i]


def test_default_list_is_documented_and_refused_for_other_clips(shapes_models):
    data = json.loads(OF.DEFAULT_CONCEPTS.read_text())
    assert data["model"] == "ViT-B-32/openai" and "NOT calibrated" in data["thresholds_basis"]
    concepts, model = OF.parse_concepts(OF.DEFAULT_CONCEPTS)
    assert len(concepts) >= 5 and model == "ViT-B-32/openai" and all(-1 <= t <= 1 for t in concepts.values())
    with pytest.raises(ConfigError, match="ViT-B-32/openai.*not shapes"):
        OutputFilter(shapes_models[1])


@pytest.mark.parametrize("spec, message", [("red", "no threshold"), ("red:x", "not a number"),
                                           ("red:2", "in \\[-1, 1\\]"), (":0.3", "no threshold")])
def test_concept_strings(spec, message):
    assert OF.parse_concepts("red:0.3, a blue square:-0.25") == ({"red": 0.3, "a blue square": -0.25}, None)
    with pytest.raises(ConfigError, match=message):
        OF.parse_concepts(spec)


def test_choose_threshold():
    pos, neg = [0.4, 0.6, 0.7, 0.8], [0.1, 0.2, 0.5, 0.65]
    t, method = OF.choose_threshold(pos, neg)
    assert method == "equal-error" and OF.rates(pos, neg, t) == (0.75, 0.25) and 0.5 < t < 0.6
    t, method = OF.choose_threshold(pos, neg, target_fpr=0.0)
    assert method == "fpr<=0" and OF.rates(pos, neg, t) == (0.5, 0.0) and 0.65 < t < 0.7


def test_calibrate_cli_writes_a_usable_concept_file(shapes_models, tmp_path, capsys):
    out, plot = tmp_path / "red.json", tmp_path / "red.png"
    assert main(["calibrate-filter", "--concept", "red", "--n", "40", "--out", str(out), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "held-out: TPR" in text and "ROC" in text and plot.stat().st_size > 0
    concepts, model = OF.parse_concepts(str(out))
    assert model == "shapes" and list(concepts) == ["red"]
    assert OutputFilter(shapes_models[1], str(out)).concepts == concepts
    figure = read_png_text(plot)["clipguide"]
    assert figure["concept"] == "red" and figure["threshold"] == pytest.approx(concepts["red"], abs=1e-4)
    assert main(["calibrate-filter", "--concept", "red", "--n", "10000000"]) == 2
    assert "--n 10000000" in capsys.readouterr().err


def test_generate_cli_filters_and_keeps_flagged(tiny_model_files, tmp_path, capsys):
    dec, clip = tiny_model_files
    small = ["--decoder", str(dec), "--clip", str(clip), "--size", "32", "--cutn", "2", "--steps", "2", "--quiet", "--preset", "shapes"]
    out = tmp_path / "run"
    # threshold -1: every snapshot is flagged (a cosine is never below -1)
    assert main(["generate", "x", *small, "--filter-concepts", "anything:-1", "--keep-flagged", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["filter"]["flagged"] and s["filter"]["action"] == "blur" for s in manifest["snapshots"])
    assert (out / "flagged" / "step_000002.png").is_file()
    capsys.readouterr()
    for args, message in ((["--keep-flagged"], "need a filter"), (["--filter"], "not " + str(clip)),
                          (["--filter-concepts", "red"], "no threshold")):
        assert main(["generate", "x", *small, *args, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
