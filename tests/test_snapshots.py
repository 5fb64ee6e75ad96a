"""Snapshots on disk: PNG provenance, manifest, contact sheet, atomic writes, output-dir rules."""

import json

import pytest
import torch

from clipguide import ConfigError, RunConfig, Snapshotter, get_preset, optimise
from clipguide.records.files import read_png_text

def run_to(out, tiny_dvae, tiny_clip, **kw):
    cfg = get_preset("shapes").replace(**{"prompts": ("a red circle",), "size": 32, "cutn": 2, "steps": 4,
                                          "snapshots": (0, 2), "decoder": "t", "clip": "t", **kw})
    saver = Snapshotter(out, cfg, preset="shapes")  # the loop describes its models
    result = optimise(cfg, tiny_dvae, tiny_clip, saver)
    saver.finish(result)
    return cfg, result


def test_snapshots_manifest_and_provenance(tmp_path, tiny_dvae, tiny_clip):
    out = tmp_path / "run"
    cfg, result = run_to(out, tiny_dvae, tiny_clip)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["contact_sheet.png", "manifest.json", "step_000000.png", "step_000002.png", "step_000004.png"]
    man = json.loads((out / "manifest.json").read_text())
    assert [s["step"] for s in man["snapshots"]] == [0, 2, 4]
    assert all(isinstance(s["loss"], float) and isinstance(s["clip_similarity"], float) for s in man["snapshots"])
    assert RunConfig.from_dict(man["config"]) == cfg.replace(device=str(tiny_clip.device)) and man["steps_done"] == 4 and not man["interrupted"]
    assert man["environment"]["threads"] == torch.get_num_threads()
    meta = read_png_text(out / "step_000002.png")["clipguide"]
    assert (meta["prompt"], meta["seed"], meta["step"], meta["preset"]) == ("a red circle", 0, 2, "shapes")
    assert meta["models"] == man["models"] == json.loads(json.dumps(result.models)) and meta["config"]["steps"] == 4
    assert meta["models"]["decoder"]["name"] == tiny_dvae.name and meta["models"]["clip"]["name"] == tiny_clip.name
    # the PNG holds the rounded image the loop produced
    from PIL import Image
    import numpy as np

    png = np.asarray(Image.open(out / "step_000004.png"), dtype=np.float32) / 255
    assert np.abs(png - result.images[0].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
    assert not list(out.glob(".*tmp")), "temporary files left behind"


def test_batch_runs_get_their_own_folders(tmp_path, tiny_dvae, tiny_clip):
    out = tmp_path / "run"
    run_to(out, tiny_dvae, tiny_clip, prompts=("a", "b"), batch=2)
    man = json.loads((out / "manifest.json").read_text())
    assert [r["dir"] for r in man["runs"]] == ["run_00", "run_01", "run_02", "run_03"]
    assert [r["seed"] for r in man["runs"]] == [0, 1, 0, 1]
    assert (out / "run_03" / "step_000004.png").exists()
    assert len(man["snapshots"]) == 4 * 3
    from PIL import Image
    import numpy as np

    sheet = np.asarray(Image.open(out / "contact_sheet.png"))  # rows: label, step labels, 32 px image
    assert sheet.shape[:2] == (4 * (14 + 14 + 32), 3 * 32)
    bands = [sheet[r * 60:r * 60 + 14] for r in range(4)]
    assert all((band < 128).any() for band in bands) and not np.array_equal(bands[0], bands[1])


def test_existing_run_dir_refused_unless_overwrite(tmp_path, tiny_dvae, tiny_clip):
    out = tmp_path / "run"
    run_to(out, tiny_dvae, tiny_clip)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match="--overwrite"):
        Snapshotter(out, get_preset("shapes"))
    assert (out / "manifest.json").read_bytes() == before
    Snapshotter(out, get_preset("shapes"), overwrite=True)


def test_unwritable_out_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="choose"):
        Snapshotter(blocker / "run", get_preset("shapes"))


def test_interrupted_run_saves_its_last_step(tmp_path, tiny_dvae, tiny_clip):
    cfg = get_preset("shapes").replace(prompts=("x",), size=32, cutn=2, steps=50, snapshots=(40,))
    out = tmp_path / "run"
    saver = Snapshotter(out, cfg)

    def stop(state):
        if state.step == 3:
            raise KeyboardInterrupt

    result = optimise(cfg, tiny_dvae, tiny_clip, [saver, stop])
    saver.finish(result)
    man = json.loads((out / "manifest.json").read_text())
    assert man["interrupted"] and man["steps_done"] == 3
    assert (out / "step_000003.png").exists() and not (out / "step_000040.png").exists()


def test_generate_one_call(tmp_path, tiny_model_files):
    import clipguide

    dec, clip = tiny_model_files
    out = tmp_path / "g"
    r = clipguide.generate("a red circle", preset="shapes", steps=3, snapshots=(1,), seed=5, out_dir=out, decoder=str(dec), clip=str(clip),
                           size=32, cutn=2)
    assert r.steps_done == 3 and set(r.snapshots) == {1} and r.runs == [("a red circle", 5)]
    assert (out / "step_000001.png").exists() and (out / "step_000003.png").exists()
    again = clipguide.generate("a red circle", preset="shapes", steps=3, seed=5, decoder=str(dec), clip=str(clip), size=32, cutn=2)
    assert torch.equal(again.images, r.images)  # no out_dir: nothing written, same image


def test_row_labels_name_run_seed_and_prompt_and_fit_the_width():
    from PIL import Image, ImageDraw, ImageFont

    from clipguide.run.snapshots import fit_text, row_labels

    assert row_labels([("a red circle on a blue background", 0), ("two\nlines  here", 3)]) == [
        "run 0 · seed 0 · a red circle on a blue background", "run 1 · seed 3 · two lines here"]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text = "run 0 · seed 0 · a red circle on a blue background"
    full = draw.textlength(text)
    assert fit_text(text, full, draw) == text
    cut = fit_text(text, full / 2, draw)
    assert cut.endswith("…") and text.startswith(cut[:-1]) and len(cut) > 5 and draw.textlength(cut) <= full / 2
    assert fit_text(text, 1, draw) == ""
    draw.font = ImageFont.load_default_imagefont()  # PIL without FreeType: Latin-1 only
    cut = fit_text("run 0 · seed 0 · 日本の 風景 and a long tail of words", 180, draw)
    assert cut.endswith("...") and cut.startswith("run 0 · seed 0 · ???") and draw.textlength(cut) <= 180


def test_contact_sheet_labels_each_row_above_its_step_labels():
    from PIL import Image
    import numpy as np

    from clipguide.run.snapshots import contact_sheet, row_labels

    images = {step: [Image.new("RGB", (48, 48), c) for c in ("red", "blue")] for step in (0, 10, 300)}
    assert contact_sheet(images).size == (3 * 48, 2 * (14 + 48))  # without row labels: as before
    long = "a yellow square on a purple background, " * 5
    sheet = contact_sheet(images, rows=row_labels([("a red circle on a blue background", 0), (long, 1)]))
    assert sheet.size == (3 * 48, 2 * (14 + 14 + 48))
    px = np.asarray(sheet)
    row_h = 14 + 14 + 48
    bands = [px[r * row_h:r * row_h + 14] for r in range(2)]
    assert all((band < 128).any() for band in bands) and not np.array_equal(bands[0], bands[1])
    assert (bands[1][:, -2:] > 200).all()  # the long prompt is cut short of the right edge
    for r, colour in enumerate(((255, 0, 0), (0, 0, 255))):
        steps = px[r * row_h + 14:r * row_h + 28]
        assert (steps < 128).any() and not np.array_equal(steps, bands[r])  # 'step N' labels under the row label
        assert (px[r * row_h + 28:(r + 1) * row_h] == colour).all()
    with pytest.raises(ValueError, match="1 row labels for 2 runs"):
        contact_sheet(images, rows=["one"])
