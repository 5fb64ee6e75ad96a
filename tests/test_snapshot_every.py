"""Snapshots every N steps (issue 37, nerdyrodent's -se): ``--snapshot-every N`` / ``--snapshots every:N``
keeps every multiple of N besides the listed steps and the last; the contact sheet and the checkpoints
thin out; resume follows."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_resume import Crash, crash_at

import clipguide
from clipguide import ConfigError, RunConfig, get_preset, optimise
from clipguide.cli import main
from clipguide.records.checkpoints import FILENAME, read_checkpoint
from clipguide.run import checkpoints as checkpoints_module
from clipguide.run.snapshots import SHEET_INTERVAL_COLUMNS, on_sheet


@pytest.fixture
def model_flags(tiny_model_files):
    dec, clip = tiny_model_files  # the tiny dVAE (with its encoder) and CLIP in their file formats
    return dict(preset="shapes", decoder=str(dec), clip=str(clip), size=32, cutn=2)


def steps_of(run) -> list[int]:
    return [s["step"] for s in json.loads((run / "manifest.json").read_text())["snapshots"]]


def test_the_interval_adds_every_multiple_to_the_listed_steps_and_the_last():
    cfg = RunConfig(steps=7, snapshots=(3,), snapshot_every=2)
    assert cfg.snapshot_steps() == (0, 2, 3, 4, 6)
    assert RunConfig(steps=7, snapshots="every:2,3") == cfg  # the --snapshots shorthand
    assert RunConfig(steps=7, snapshots=(3,)).snapshot_steps() == (3,)  # the list alone, as before
    with pytest.raises(ConfigError, match="two intervals"):
        RunConfig(steps=7, snapshots="every:2", snapshot_every=3)


def test_files_manifest_and_result_hold_every_multiple(model_flags, tmp_path, monkeypatch):
    written = []
    real = checkpoints_module.write_checkpoint
    monkeypatch.setattr(checkpoints_module, "write_checkpoint", lambda path, ck, info: (written.append(ck.step), real(path, ck, info)))
    run = tmp_path / "run"
    result = clipguide.generate("a red circle", out_dir=run, steps=7, snapshots=(3,), snapshot_every=2,
                                checkpoint_every=0, **model_flags)
    assert steps_of(run) == [0, 2, 3, 4, 6, 7]
    assert sorted(p.name for p in run.glob("step_*.png")) == [f"step_{k:06d}.png" for k in (0, 2, 3, 4, 6, 7)]
    assert set(result.snapshots) == {0, 2, 3, 4, 6}
    assert written == [3, 7]  # the listed snapshot and the end: the interval's snapshots write no checkpoint
    # snapshot k is the image of step k: that of a k-step run
    short = clipguide.generate("a red circle", steps=4, **model_flags)
    assert torch.equal(result.snapshots[4], short.images)


def test_the_cli_takes_every_n_in_snapshots(model_flags, tmp_path, capsys):
    flags = [f"--{k}={v}" for k, v in model_flags.items()]
    run = tmp_path / "run"
    assert main(["generate", "x", "--steps", "5", "--snapshots", "every:2,5", "--out", str(run), "--quiet", *flags]) == 0
    assert steps_of(run) == [0, 2, 4, 5]
    assert json.loads((run / "manifest.json").read_text())["config"]["snapshot_every"] == 2
    capsys.readouterr()
    for bad, part in (("every:x", "every:N with a whole number"), ("every:2,a", "takes steps and every:N")):
        assert main(["generate", "x", "--snapshots", bad, "--out", str(tmp_path / "no"), "--quiet", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and part in err, err
    assert main(["generate", "x", "--snapshot-every", "-1", "--out", str(tmp_path / "no"), "--quiet", *flags]) == 2
    assert "--snapshot-every must be 0" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_every_step_keeps_every_png_and_a_sheet_of_at_most_16_interval_columns(tiny_dvae, tiny_clip, tmp_path):
    cfg = get_preset("shapes").replace(prompts=("x",), size=32, cutn=2, steps=40, snapshot_every=1, decoder="t", clip="t")
    saver = clipguide.Snapshotter(tmp_path / "run", cfg)
    saver.finish(optimise(cfg, tiny_dvae, tiny_clip, saver))
    assert len(list((tmp_path / "run").glob("step_*.png"))) == 41
    shown = [k for k in range(41) if on_sheet(cfg, k)]
    assert shown == [*range(0, 40, 3), 40]  # every 3rd of the 41 (ceil(41 / 16)), and the last
    assert len(shown) - 1 <= SHEET_INTERVAL_COLUMNS and sorted(saver.images) == shown  # only those held in memory
    assert Image.open(tmp_path / "run" / "contact_sheet.png").width == 32 * len(shown)
    listed = cfg.replace(snapshots=(7,))
    assert on_sheet(listed, 7) and not on_sheet(cfg, 7)  # a listed step is always shown


def test_a_crashed_run_resumes_to_the_same_snapshots(model_flags, tmp_path):
    kw = dict(steps=9, snapshots=(5,), snapshot_every=2, seed=3, **model_flags)
    reference = clipguide.generate("a red circle", out_dir=tmp_path / "ref", **kw)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        clipguide.generate("a red circle", out_dir=run, callback=crash_at(7), checkpoint_every=4, **kw)
    assert read_checkpoint(run / FILENAME).step == 5 and steps_of(run) == [0, 2, 4, 5, 6]  # behind the snapshots
    resumed = clipguide.resume(run)
    assert torch.equal(resumed.images, reference.images) and set(resumed.snapshots) == {5, 6, 8}  # from the checkpoint on
    ref = json.loads((tmp_path / "ref" / "manifest.json").read_text())["snapshots"]
    got = json.loads((run / "manifest.json").read_text())["snapshots"]
    assert [(s["step"], s["loss"]) for s in got] == [(s["step"], s["loss"]) for s in ref]  # 6 not written twice
    for s in ref:
        assert (Image.open(run / s["file"]).tobytes() == Image.open(tmp_path / "ref" / s["file"]).tobytes()), s["step"]
