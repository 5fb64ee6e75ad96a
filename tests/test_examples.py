"""Every example runs offline as a subprocess with small step counts, and its --help is its docstring."""

import ast
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipguide.run.experiments import SHAPES_EXPERIMENTS, scaled_snapshots
from clipguide.records.files import read_png_text

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS = 4
QUICK = {"CLIPGUIDE_EXAMPLE_STEPS": str(STEPS), "CLIPGUIDE_EXAMPLE_CUTN": "2", "CLIPGUIDE_EXAMPLE_IMAGES": "2",
         "CLIPGUIDE_EXAMPLE_PRESET": "shapes",  # the recipe without the prior: no 512 candidates per run
         "OMP_NUM_THREADS": "1"}


def run(script: str, *args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, **QUICK, "CLIPGUIDE_CACHE": str(Path(cwd) / "empty-cache")}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_examples_are_there():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == [
        "bias_audit.py", "replay.py", "reproduce_seed_experiments.py", "weighted_prompts.py"]


def run_here(script: str, *args) -> int:
    """Run an example in this process (its imports are loaded already): its exit status."""
    with pytest.raises(SystemExit) as stop:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", [script, *map(str, args)])
            runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return stop.value.code


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_help_is_the_docstring(script, capsys):
    assert run_here(script, "--help") == 0
    doc = ast.get_docstring(ast.parse((EXAMPLES / script).read_text()))
    assert " ".join(doc.split()) in " ".join(capsys.readouterr().out.split())


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory):
    """The offline seed-experiment stand-in, run once by the example."""
    cwd = tmp_path_factory.mktemp("seed")
    proc = run("reproduce_seed_experiments.py", "--offline", "--out", "runs", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "runs", proc


def test_reproduce_seed_experiments_offline(seed_runs):
    out, proc = seed_runs
    assert "shapes-world stand-in" in proc.stdout
    dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert [json.loads((d / "manifest.json").read_text())["runs"][0]["prompt"] for d in dirs] == list(
        SHAPES_EXPERIMENTS.prompts)
    for d in dirs:
        manifest = json.loads((d / "manifest.json").read_text())
        assert [s["step"] for s in manifest["snapshots"]] == list(scaled_snapshots(STEPS))
        sheet = read_png_text(d / "contact_sheet.png")["clipguide"]  # figures carry their provenance
        assert "reproduce_seed_experiments.py" in sheet["environment"]["command"]
        assert sheet["runs"][0]["seed"] == 0 and sheet["models"]["clip"]["sha256"]


def test_replay_example_exit_codes(seed_runs, tmp_path, capsys):
    run_dir = sorted(p for p in seed_runs[0].iterdir() if p.is_dir())[0]
    assert run_here("replay.py", "--manifest", run_dir / "manifest.json") == 0  # recorded on one thread, as here
    assert "identical: all 2 recorded snapshots reproduced bit for bit" in capsys.readouterr().out

    png = run_dir / f"step_{STEPS:06d}.png"
    pixels = np.asarray(Image.open(png)).copy()
    pixels[5, 5] ^= 1  # one bit of one pixel
    Image.fromarray(pixels).save(png)
    proc = run("replay.py", "--manifest", run_dir / "manifest.json", cwd=tmp_path)
    assert proc.returncode == 1 and f"step {STEPS} (step_{STEPS:06d}.png): max abs pixel difference 1/255" in proc.stdout



def test_replay_example_refuses_a_bad_manifest_in_one_line(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"config": {"steps": "many"}}')
    assert run_here("replay.py", "--manifest", tmp_path / "manifest.json") == 2
    err = capsys.readouterr().err
    assert err.startswith("replay: error: manifest") and "is corrupt" in err and err.count("\n") == 1


def test_weighted_prompts(tmp_path):
    proc = run("weighted_prompts.py", "--out", "runs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = tmp_path / "runs"
    blend = json.loads((runs / "blend" / "manifest.json").read_text())["runs"][0]
    assert [p["role"] for p in blend["parents"]] == ["image_prompt", "image_prompt"]
    assert "<- run 0 of" in proc.stdout and (runs / "lineage.png").is_file()
    negative = read_png_text(runs / "negative" / f"step_{STEPS:06d}.png")["clipguide"]
    assert negative["prompt"].endswith("a red square:-0.5") and negative["config"]["steps"] == STEPS


def test_bias_audit_offline(tmp_path):
    proc = run("bias_audit.py", "--out", "audit", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = json.loads((tmp_path / "audit" / "bias.json").read_text())
    assert {r["prompt"] for r in table["rows"]} == {"a circle", "a square", "a triangle"}
    assert all(r["n"] == 2 for r in table["rows"]) and table["generation"]["steps"] == STEPS
    for prompt in ("a circle", "a square", "a triangle"):  # each prompt's images fall in exactly one colour
        assert sum(r["count"] for r in table["rows"] if r["prompt"] == prompt) == 2
    assert (tmp_path / "audit" / "bias.png").is_file() and "Wilson" in proc.stdout
    manifest = json.loads((tmp_path / "audit" / "images" / "batch_00" / "manifest.json").read_text())
    assert "bias_audit.py" in manifest["environment"]["command"]
