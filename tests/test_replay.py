"""Replay from a manifest: bit-for-bit reproduction, and a report naming what differs."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import clipguide
from clipguide import ConfigError, replay
from clipguide.records.manifest import cpu_vendor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def recorded(tmp_path, tiny_model_files):
    """A finished 3-step run on the tiny models, recorded on one thread."""
    dec, clip = tiny_model_files
    out = tmp_path / "run"
    clipguide.generate("a red circle", preset="shapes", steps=3, snapshots=(0, 2), seed=4, decoder=str(dec), clip=str(clip),
                       size=32, cutn=2, out_dir=out)
    return out


def edited(run_dir, tmp_path, change):
    """A copy of a run whose manifest went through ``change(manifest)``."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy / "manifest.json"


def test_replay_reproduces_the_recorded_images_bit_for_bit(recorded, tmp_path):
    report = replay(recorded / "manifest.json", out_dir=tmp_path / "again")
    assert report.identical and report.differences == []
    assert [(s.step, s.max_abs_diff) for s in report.snapshots] == [(0, 0), (2, 0), (3, 0)]
    assert "identical" in str(report)
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["config"] == json.loads((recorded / "manifest.json").read_text())["config"]
    assert replay(recorded).identical  # a run directory works too; the temporary replay is removed


def test_a_batch_replays_run_by_run(tmp_path, tiny_model_files):
    dec, clip = tiny_model_files
    out = tmp_path / "batch"
    clipguide.generate(["a red circle", "a blue square"], preset="shapes", steps=2, batch=2, decoder=str(dec), clip=str(clip),
                       size=32, cutn=2, out_dir=out)
    report = replay(out)
    assert report.identical
    assert sorted({(s.run, s.file.split("/")[0]) for s in report.snapshots}) == [
        (0, "run_00"), (1, "run_01"), (2, "run_02"), (3, "run_03")]


def test_a_changed_snapshot_is_reported_with_its_pixel_difference(recorded, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(recorded, copy)
    png = copy / "step_000002.png"
    pixels = np.asarray(Image.open(png)).copy()
    pixels[0, 0] = (pixels[0, 0].astype(int) + 3) % 256
    Image.fromarray(pixels).save(png)
    report = replay(copy / "manifest.json")
    assert not report.identical
    assert report.differences == ["run 0 step 2 (step_000002.png): max abs pixel difference 3/255"]
    assert "DIFFERENT: 1 of 3" in str(report)


def test_environment_and_model_differences_are_named(recorded, tmp_path):
    def change(m):
        m["environment"].update(torch="0.0.1", threads=7, cpu="OtherVendor")
        m["models"]["decoder"]["sha256"] = "0" * 64

    report = replay(edited(recorded, tmp_path, change), threads=1)
    assert report.identical  # recorded on one thread, replayed on one: same pixels
    assert "torch: recorded 0.0.1, replayed with" in report.differences[0]
    assert "threads: recorded 7, replayed with 1" in report.differences
    assert f"cpu: recorded OtherVendor, replayed with {cpu_vendor()}" in report.differences
    assert any(d.startswith("decoder sha256: recorded 000") for d in report.differences)


def test_a_manifest_from_before_the_cpu_was_recorded_is_not_called_different(recorded, tmp_path):
    assert json.loads((recorded / "manifest.json").read_text())["environment"]["cpu"] == cpu_vendor()
    report = replay(edited(recorded, tmp_path, lambda m: m["environment"].pop("cpu")), threads=1)
    assert report.identical and not [d for d in report.differences if d.startswith("cpu")], report.differences


def test_a_changed_seed_is_caught_against_the_pngs_provenance(recorded, tmp_path):
    def change(m):
        m["config"]["seed"] = m["runs"][0]["seed"] = 5

    report = replay(edited(recorded, tmp_path, change))
    assert not report.identical
    assert "run 0 seed: the manifest says 5, step_000000.png's provenance says 4" in report.differences
    assert any("max abs pixel difference" in d for d in report.differences)


def test_an_interrupted_run_replays_to_the_step_it_reached(tmp_path, tiny_model_files):
    dec, clip = tiny_model_files

    def stop(state):
        if state.step == 2:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    result = clipguide.generate("a blue square", preset="shapes", steps=5, snapshots=(1, 4), decoder=str(dec), clip=str(clip),
                                size=32, cutn=2, out_dir=out, callback=stop)
    assert result.interrupted and result.steps_done == 2
    report = replay(out)
    assert report.identical and [s.step for s in report.snapshots] == [1, 2]
    assert report.differences == ["the recorded run was interrupted at step 2 of 5: replayed 2 steps"]


@pytest.mark.parametrize("content", ["{not json", '{"config": {}}', "[]"])
def test_a_bad_manifest_is_one_clear_error(tmp_path, content):
    path = tmp_path / "manifest.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as e:
        replay(path)
    assert ("is not valid JSON" in str(e.value) or "is corrupt" in str(e.value)) and "\n" not in str(e.value)


def test_a_damaged_config_is_named(recorded, tmp_path):
    with pytest.raises(ConfigError, match=r"is corrupt \(config: unknown config field\(s\) colour"):
        replay(edited(recorded, tmp_path, lambda m: m["config"].update(colour=1)))


def test_replay_never_overwrites_the_recorded_run(recorded):
    with pytest.raises(ConfigError, match="is the recorded run itself"):
        replay(recorded / "manifest.json", out_dir=recorded)


def test_a_filtered_run_replays_with_its_recorded_filter(tmp_path, tiny_model_files):
    from clipguide import OutputFilter

    dec, clip = tiny_model_files
    out = tmp_path / "run"
    flag_all = OutputFilter(str(clip), {"anything": -1.0}, action="blur")  # every cosine is >= -1: all blurred
    clipguide.generate("a red circle", preset="shapes", steps=2, decoder=str(dec), clip=str(clip), size=32, cutn=2, out_dir=out,
                       output_filter=flag_all)
    assert json.loads((out / "manifest.json").read_text())["snapshots"][0]["filter"]["action"] == "blur"
    report = replay(out)
    assert report.identical, report.differences
