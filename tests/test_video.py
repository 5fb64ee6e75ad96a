"""``clipguide video RUN_DIR``: a run's snapshots as a GIF, WebP or mp4 at the given fps, one frame per
snapshot, with the run's provenance in the file's metadata, written atomically; bad input is one line, exit 2."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

import clipguide
from clipguide import ConfigError
from clipguide.cli import main
from clipguide.records.video import read_video_provenance, write_video

STEPS = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A batch of two runs (run_00, run_01) with a snapshot at every step, zooming every 2 steps."""
    out = tmp_path_factory.mktemp("video") / "run"
    clipguide.generate("a red circle", preset="shapes", out_dir=out, batch=2, steps=4, size=64, cutn=2, snapshots=STEPS,
                       zoom_every=2, zoom_scale=1.2)
    return out


def snapshots(run_dir, run):
    return [np.asarray(Image.open(run_dir / f"run_{run:02d}" / f"step_{k:06d}.png").convert("RGB")) for k in STEPS]


def pillow_frames(path):
    """(frames as arrays, durations in ms) of an animated GIF or WebP."""
    frames, durations = [], []
    with Image.open(path) as im:
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
            durations.append(im.info["duration"])
    return frames, durations


def expanded(frames, durations, fps):
    """Each frame repeated for its duration: the encoders merge a frame equal to the one before into it."""
    return [f for f, d in zip(frames, durations) for _ in range(round(d * fps / 1000))]


def check_provenance(path, run_dir, run, fps):
    record = read_video_provenance(path)["clipguide"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert record["steps"] == list(STEPS) and record["fps"] == fps and record["run"] == run
    assert (record["prompt"], record["seed"]) == ("a red circle", manifest["runs"][run]["seed"])
    assert record["config"] == manifest["config"] and record["models"] == manifest["models"]
    assert record["config"]["zoom_every"] == 2


@pytest.mark.parametrize("fmt, tolerance", [("webp", 0), ("gif", 0.03)])  # lossless WebP; GIF: a 256-colour palette
def test_pillow_formats_hold_every_snapshot_at_the_fps_with_provenance(run_dir, fmt, tolerance):
    path = write_video(run_dir, fmt=fmt, fps=5, run=1)
    assert path == run_dir / "run_01" / f"video.{fmt}"
    assert Image.open(path).format == fmt.upper()
    frames, durations = pillow_frames(path)
    assert sum(durations) == pytest.approx(1000 * len(STEPS) / 5)  # five snapshots at 5 fps: one second
    shown = expanded(frames, durations, 5)
    assert len(shown) == len(STEPS)
    for got, want in zip(shown, snapshots(run_dir, 1)):
        assert np.abs(got.astype(float) - want).mean() / 255 <= tolerance
    check_provenance(path, run_dir, 1, 5)
    assert not list(path.parent.glob(".*.tmp"))  # written atomically: no temporary file left


def test_mp4_has_one_frame_per_snapshot_at_the_fps_with_provenance(run_dir, tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    path = write_video(run_dir, tmp_path / "zoom.mp4", fps=4, run=0)  # the format from the suffix
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frames = [np.frombuffer(f, np.uint8).reshape(64, 64, 3) for f in reader]
    assert meta["fps"] == 4 and tuple(meta["size"]) == (64, 64) and len(frames) == len(STEPS)
    for got, want in zip(frames, snapshots(run_dir, 0)):  # H.264 at CRF 17 in yuv420p: close, not exact
        assert np.abs(got.astype(float) - want).mean() < 12
    check_provenance(path, run_dir, 0, 4)


def test_the_cli_writes_the_file_it_names(run_dir, tmp_path, capsys):
    out = tmp_path / "a.gif"
    assert main(["video", str(run_dir), "--fps", "2", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert Image.open(out).format == "GIF" and read_video_provenance(out)["clipguide"]["run"] == 0


def test_mp4_without_imageio_ffmpeg_names_the_extra(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"clipguide\[video\]"):
        write_video(run_dir, tmp_path / "a.mp4")
    assert not (tmp_path / "a.mp4").exists()


def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text((run_dir / "manifest.json").read_text())
    manifest = json.loads((empty / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "snapshots": []}))
    cases = [([str(tmp_path)], "is " + str(tmp_path) + " a clipguide run directory"),
             ([str(empty)], "no snapshots"),
             ([str(run_dir), "--run", "2"], "--run 2 is out of range"),
             ([str(run_dir), "--fps", "0"], "--fps must be more than 0"),
             ([str(run_dir), "--fps", "many"], "invalid float value"),
             ([str(run_dir), "--format", "avi"], "invalid choice"),
             ([str(run_dir), "--format", "gif", "--out", str(tmp_path / "a.webp")], "make them agree")]
    for argv, words in cases:
        assert main(["video", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, (argv, err)
