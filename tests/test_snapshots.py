"""Snapshots on disk: PNG provenance, manifest, contact sheet, atomic writes, output-dir rules."""

import json

import pytest
import torch

from clipguide import ConfigError, RunConfig, Snapshotter, get_preset, optimise
from clipguide.snapshots import read_png_text

MODELS = {"decoder": {"name": "tiny", "sha256": "ab" * 32}, "clip": {"name": "tiny", "sha256": None}}


def run_to(out, tiny_dvae, tiny_clip, **kw):
    cfg = get_preset("shapes").replace(**{"prompts": ("a red circle",), "size": 32, "cutn": 2, "steps": 4,
                                          "snapshots": (0, 2), "decoder": "t", "clip": "t", **kw})
    saver = Snapshotter(out, cfg, MODELS, preset="shapes")
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
    assert RunConfig.from_dict(man["config"]) == cfg and man["steps_done"] == 4 and not man["interrupted"]
    assert man["environment"]["threads"] == torch.get_num_threads()
    meta = read_png_text(out / "step_000002.png")["clipguide"]
    assert (meta["prompt"], meta["seed"], meta["step"], meta["preset"]) == ("a red circle", 0, 2, "shapes")
    assert meta["models"]["decoder"]["sha256"] == "ab" * 32 and meta["config"]["steps"] == 4
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


def test_existing_run_dir_refused_unless_overwrite(tmp_path, tiny_dvae, tiny_clip):
    out = tmp_path / "run"
    run_to(out, tiny_dvae, tiny_clip)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match="--overwrite"):
        Snapshotter(out, get_preset("shapes"), MODELS)
    assert (out / "manifest.json").read_bytes() == before
    Snapshotter(out, get_preset("shapes"), MODELS, overwrite=True)


def test_unwritable_out_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="choose"):
        Snapshotter(blocker / "run", get_preset("shapes"), MODELS)


def test_interrupted_run_saves_its_last_step(tmp_path, tiny_dvae, tiny_clip):
    cfg = get_preset("shapes").replace(prompts=("x",), size=32, cutn=2, steps=50, snapshots=(40,))
    out = tmp_path / "run"
    saver = Snapshotter(out, cfg, MODELS)

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
    r = clipguide.generate("a red circle", steps=3, snapshots=(1,), seed=5, out_dir=out, decoder=str(dec), clip=str(clip),
                           size=32, cutn=2)
    assert r.steps_done == 3 and set(r.snapshots) == {1} and r.runs == [("a red circle", 5)]
    assert (out / "step_000001.png").exists() and (out / "step_000003.png").exists()
    again = clipguide.generate("a red circle", steps=3, seed=5, decoder=str(dec), clip=str(clip), size=32, cutn=2)
    assert torch.equal(again.images, r.images)  # no out_dir: nothing written, same image
