"""Sweeps: specs expanded to points, batched where they may share a batch, run here or on Ray, resumable."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipguide import generate
from clipguide.cli import main
from clipguide.errors import ConfigError
from clipguide.records.files import read_png_text
from clipguide.sweeps.driver import sweep
from clipguide.sweeps.groups import group_points
from clipguide.sweeps.spec import SweepSpec

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
# the shapes default's size and cutouts: there batched runs are bit-identical to runs alone (see test below)
SMALLEST = {"preset": "shapes", "steps": 4, "axes": {"prompt": PROMPTS, "seed": [0, 1]}}
BATCHED = {**SMALLEST, "max_batch": 8}  # on the CPU the local executor batches only when asked


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def final_images(result) -> list[np.ndarray]:
    return [pixels(result.out_dir / p["file"]) for p in result.points]


def test_the_smallest_spec_expands_to_a_grid_in_axis_order():
    points = SweepSpec.from_dict(SMALLEST).points()
    assert [(p.prompt, p.config.seed, p.config.steps, p.config.batch) for p in points] == [
        (PROMPTS[0], 0, 4, 1), (PROMPTS[0], 1, 4, 1), (PROMPTS[1], 0, 4, 1), (PROMPTS[1], 1, 4, 1)]
    assert all(p.preset == "shapes" and p.config.decoder == "shapes-dvae" for p in points)


def test_zipped_axes_vary_together_and_axis_files_are_read(tmp_path):
    (tmp_path / "prompts.txt").write_text("# two\na red circle\n\na blue square\n")
    (tmp_path / "spec.json").write_text(json.dumps({
        "preset": "shapes", "steps": 2, "axes": {"prompt": {"file": "prompts.txt"}, "cutn": [2, 4], "seed": [5, 6]},
        "zip": [["prompt", "cutn"]]}))
    spec = SweepSpec.from_file(tmp_path / "spec.json")
    assert [(p.prompt, p.config.cutn, p.config.seed) for p in spec.points()] == [
        ("a red circle", 2, 5), ("a red circle", 2, 6), ("a blue square", 4, 5), ("a blue square", 4, 6)]
    assert spec.to_dict()["axes"]["prompt"] == ["a red circle", "a blue square"]  # recorded as read


def test_points_share_a_batch_only_with_consecutive_seeds_and_equal_settings():
    spec = SweepSpec.from_dict({"preset": "shapes", "axes": {"prompt": ["a", "b"], "seed": [0, 1, 2, 5], "cutn": [2, 3]}})
    groups = group_points(spec.points(), max_batch=4)
    described = [(g.config.prompts, g.config.seed, g.config.batch, g.config.cutn) for g in groups]
    assert described == [(("a",), 0, 3, 2), (("a",), 0, 3, 3), (("a", "b"), 5, 1, 2), (("a", "b"), 5, 1, 3),
                         (("b",), 0, 3, 2), (("b",), 0, 3, 3)]
    for g in groups:  # a group's runs are its points, in its config's order
        runs = [(p.prompt, p.config.seed) for p in (spec.points()[i] for i in g.points)]
        assert runs == g.config.runs()
    assert sorted(i for g in groups for i in g.points) == list(range(16))
    assert all(len(g.points) == 1 for g in group_points(spec.points(), max_batch=1))


@pytest.mark.parametrize("spec, message", [
    ({"preset": "shapes", "prompt": "a red circle", "stpes": 4}, "unknown key 'stpes'"),
    ({"preset": "shapes", "axes": {"prompt": [], "seed": [0]}}, "axis prompt is empty"),
    ({"preset": "no-such-preset", "prompt": "a red circle"}, "unknown preset 'no-such-preset'"),
    ({"preset": "shapes", "axes": {"prompt": ["a red circle"], "preset": ["shapes", "nope"]}}, "unknown preset 'nope'"),
    ({"preset": "shapes", "axes": {"colour": ["red"]}, "prompt": "x"}, "unknown axis 'colour'"),
    ({"preset": "shapes", "axes": {"seed": [0, 0]}, "prompt": "x"}, "are the same run"),
    ({"preset": "shapes", "axes": {"seed": [0]}}, "has no prompt"),
    ({"preset": "shapes", "prompt": "x", "batch": 2}, "a sweep sets 'batch' itself"),
    ({"preset": "shapes", "prompt": "x", "steps": "4"}, "config field steps is '4': expected int"),
    ({"preset": "shapes", "axes": {"prompt": ["a"], "seed": [0, 1]}, "zip": [["prompt", "seed"]]}, "different lengths"),
])
def test_a_bad_spec_is_one_line_exit_2_and_nothing_starts(spec, message, tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_batched_local_sweep_equals_each_point_run_alone(tmp_path):
    assert sweep(SMALLEST, tmp_path / "default", progress=False).counts["done"] == 4
    assert json.loads((tmp_path / "default" / "sweep.json").read_text())["max_batch"] == 1  # the CPU's default
    result = sweep(BATCHED, tmp_path / "sweep", progress=False)
    assert result.complete and len({p["run_dir"] for p in result.points}) == 1  # one batch of four runs
    for p, image in zip(result.points, final_images(result)):
        alone = generate(p["values"]["prompt"], "shapes", steps=4, seed=p["values"]["seed"], snapshots=(),
                         out_dir=tmp_path / f"alone{p['index']}")
        assert np.array_equal(image, pixels(tmp_path / f"alone{p['index']}" / "step_000004.png"))
        assert p["loss"] == pytest.approx(float(alone.losses[-1, 0])) and p["state"] == "done"
    ledger = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert ledger["spec"]["axes"]["prompt"] == PROMPTS and ledger["max_batch"] == 8
    csv = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
    assert csv[0].startswith("prompt,seed,index,state,file,loss") and len(csv) == 5
    sheet = read_png_text(tmp_path / "sweep" / "contact_sheet.png")["clipguide"]["sweep"]
    assert (sheet["rows"], sheet["column"]) == (["prompt"], "seed")


class StopAtCall:
    """A step callback that presses Ctrl-C at its n-th call."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, state):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


def test_an_interrupted_sweep_run_again_finishes_as_an_uninterrupted_one(tmp_path):
    spec = {**SMALLEST, "steps": 6, "max_batch": 1, "checkpoint_every": 2}
    whole = sweep(spec, tmp_path / "whole", progress=False)
    with pytest.raises(KeyboardInterrupt):  # point 0 has steps 0..6; stop point 1 after its step 4
        sweep(spec, tmp_path / "part", callback=StopAtCall(7 + 5), progress=False)
    ledger = json.loads((tmp_path / "part" / "sweep.json").read_text())
    assert [p["state"] for p in ledger["points"]] == ["done", "pending", "pending", "pending"]
    assert (tmp_path / "part" / ledger["points"][1]["run_dir"] / "checkpoint.safetensors").is_file()
    calls = StopAtCall(0)
    resumed = sweep(spec, tmp_path / "part", callback=calls, progress=False)
    assert resumed.complete and calls.calls == 3 + 7 + 7  # point 0 skipped, point 1 from its checkpoint at step 4
    for a, b in zip(final_images(whole), final_images(resumed)):
        assert np.array_equal(a, b)
    assert [p["loss"] for p in resumed.points] == [p["loss"] for p in whole.points]
    with pytest.raises(ConfigError, match=r"other settings \(steps differ\)"):
        sweep({**spec, "steps": 7}, tmp_path / "part", progress=False)
    assert sweep({**spec, "steps": 7}, tmp_path / "part", overwrite=True, progress=False).complete


def test_the_cli_runs_a_yaml_spec_and_reruns_it_without_work(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("preset: shapes\nsteps: 2\nsize: 64\ncutn: 2\nscore: shapes\n"
                    "classify: {labels: [a red shape, a green shape], clip: shapes}\n"
                    "axes:\n  prompt: [a red circle, a green square]\n")
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--quiet"]) == 0
    assert "2 of 2 points done" in capsys.readouterr().err
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert all(p["label"] in ("a red shape", "a green shape") and 0 < p["label_probability"] <= 1 for p in points)
    assert all(isinstance(p["clip_score"], float) for p in points)
    before = (out / "sweep.json").read_bytes()
    assert main(["sweep", str(spec), "--out", str(out), "--quiet"]) == 0
    assert (out / "sweep.json").read_bytes() == before
    assert main(["sweep", str(spec), "--out", str(out), "--address", "auto"]) == 2
    assert "--address is for --executor ray" in capsys.readouterr().err


# ---- Ray: a real local Ray (2 CPUs), started once for these tests -------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")  # CI installs it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_sweep_on_ray_gives_the_images_of_the_local_sweep(local_ray, tmp_path):
    local = sweep(BATCHED, tmp_path / "local", progress=False)
    on_ray = sweep(SMALLEST, tmp_path / "ray", "ray", progress=False)
    assert on_ray.complete and len({p["run_dir"] for p in on_ray.points}) == 4  # one task per point
    for a, b in zip(final_images(local), final_images(on_ray)):
        assert np.array_equal(a, b)


def ray_task_pids() -> list[int]:
    """Processes running a sweep task (Ray titles a worker with the task it executes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::run_task"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_killed_ray_worker_is_retried_and_the_sweep_completes_identical(local_ray, tmp_path):
    spec = {"preset": "shapes", "steps": 40, "checkpoint_every": 4, "max_batch": 1,
            "axes": {"prompt": PROMPTS[:1], "seed": [0, 1]}}
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if list((tmp_path / "ray").glob("*/checkpoint.safetensors")):
                for pid in ray_task_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    on_ray = sweep(spec, tmp_path / "ray", "ray", progress=False)
    killer.join()
    assert killed and on_ray.complete
    manifests = [json.loads((tmp_path / "ray" / p["run_dir"] / "manifest.json").read_text()) for p in on_ray.points]
    assert any(m.get("resumed") for m in manifests)  # a retried task continued from its checkpoint
    local = sweep(spec, tmp_path / "local", progress=False)
    for a, b in zip(final_images(local), final_images(on_ray)):
        assert np.array_equal(a, b)


def test_a_bias_audit_on_ray_counts_what_the_local_audit_counts(local_ray, tmp_path):
    from clipguide import audit_bias

    kw = dict(preset="shapes", images_per_prompt=2, steps=2, seed=3, batch_size=4)
    local = audit_bias(PROMPTS, ("a red shape", "a green shape"), out_dir=tmp_path / "local", **kw)
    on_ray = audit_bias(PROMPTS, ("a red shape", "a green shape"), out_dir=tmp_path / "ray", executor="ray",
                        **{**kw, "batch_size": 1})
    assert on_ray.rows == local.rows
    assert [im["probabilities"] for im in on_ray.images] == [im["probabilities"] for im in local.images]
    assert len(json.loads((tmp_path / "ray" / "images" / "sweep.json").read_text())["runs"]) == 4  # a task per image
