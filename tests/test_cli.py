"""The command line: a real run end to end, every user error as one line with exit code 2, Ctrl-C."""

import json
import signal
import subprocess
import sys
import time

import pytest

from clipguide.cli import main


@pytest.fixture
def small(tiny_model_files, tmp_path):
    dec, clip = tiny_model_files
    return ["--decoder", str(dec), "--clip", str(clip), "--size", "32", "--cutn", "2", "--preset", "shapes"]


def run_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "clipguide.cli", *args], capture_output=True, text=True, timeout=300, **kw)


def test_generate_end_to_end(small, tmp_path):
    out = tmp_path / "run"
    p = run_cli(["generate", "a red circle on a blue background", *small, "--steps", "3", "--snapshots", "0,2",
                 "--out", str(out), "--quiet"])
    assert p.returncode == 0, p.stderr
    assert "tiny-dvae" in p.stderr and str(out) in p.stderr  # says which models and where the run went
    man = json.loads((out / "manifest.json").read_text())
    assert [s["step"] for s in man["snapshots"]] == [0, 2, 3]
    assert man["models"]["decoder"]["sha256"] and man["models"]["clip"]["sha256"]
    assert (out / "contact_sheet.png").exists()


def one_line_error(capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and needle in err, err
    return err


def test_user_errors_are_one_line_exit_2(capsys, small, tmp_path):
    out = ["--out", str(tmp_path / "r")]
    one_line_error(capsys, ["generate", "  ", *small, *out], "empty prompt")
    one_line_error(capsys, ["generate", "x", "--preset", "aleph3image", *out], "unknown preset")
    one_line_error(capsys, ["generate", "x", "--steps", "0", *out], "--steps")
    one_line_error(capsys, ["generate", "x", "--steps", "-5", *out], "--steps")
    one_line_error(capsys, ["generate", "x", "--steps", "10", "--snapshots", "100", *out], "--snapshots 100")
    one_line_error(capsys, ["generate", "x", "--steps", "ten", *out], "--steps")
    one_line_error(capsys, ["generate", "x", "--device", "cuda", *out], "CUDA")
    one_line_error(capsys, ["generate", "x", "--clip", "NoSuchNet-B-32/openai", *small[:2], *out], "NoSuchNet")
    one_line_error(capsys, ["generate", "x", "--decoder", str(tmp_path / "nope" / "decoder.pkl"), *out], "decoder.pkl")
    bad = tmp_path / "decoder.pkl"
    bad.write_bytes(b"this is not a pickle")
    one_line_error(capsys, ["generate", "x", "--decoder", str(bad), *small[2:], *out], str(bad))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(capsys, ["generate", "x", *small, "--out", str(blocker / "run")], "choose")
    assert not (tmp_path / "r").exists(), "a failed run left its directory behind"


def test_existing_run_dir_needs_overwrite(capsys, small, tmp_path):
    out = tmp_path / "run"
    assert main(["generate", "x", *small, "--steps", "1", "--out", str(out), "--quiet"]) == 0
    before = (out / "manifest.json").read_bytes()
    capsys.readouterr()
    one_line_error(capsys, ["generate", "x", *small, "--steps", "1", "--out", str(out)], "--overwrite")
    assert (out / "manifest.json").read_bytes() == before
    assert main(["generate", "y", *small, "--steps", "1", "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert json.loads((out / "manifest.json").read_text())["runs"][0]["prompt"] == "y"


def test_subprocess_error_has_no_traceback(tmp_path):
    p = run_cli(["generate", "x", "--preset", "nope", "--out", str(tmp_path / "r")])
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_ctrl_c_writes_final_snapshot_and_exits_130(small, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "clipguide.cli", "generate", "x", *small, "--steps", "100000",
                             "--snapshots", "0,1", "--out", str(out), "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "step_000001.png").exists() and time.time() < deadline:  # at least one step done
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    man = json.loads((out / "manifest.json").read_text())
    assert man["interrupted"] and man["steps_done"] > 0
    assert (out / f"step_{man['steps_done']:06d}.png").exists() and (out / "contact_sheet.png").exists()


def test_presets_and_models_list(capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    assert all(n in text for n in ("aleph2image-delta", "dvae-codebook", "deviations"))
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "dalle" in text and "ViT-B-32/openai" in text


def test_train_shapes_passes_its_options_on(capsys):
    """`clipguide train-shapes --only ...` reaches the training command (argparse alone refuses a leading option)."""
    assert main(["train-shapes", "--only", "nosuch"]) == 2
    assert "unknown model kind(s) nosuch" in capsys.readouterr().err
    assert main(["generate", "x", "--bogus", "1"]) == 2
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err
