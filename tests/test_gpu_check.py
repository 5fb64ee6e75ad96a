"""benchmarks/gpu_check.py (issue 36) works before it meets a GPU: its --smoke mode runs every
section on the CPU with the shapes-world models, and the report has every section, with numbers
where numbers belong."""

from __future__ import annotations

import json
import numbers
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ("environment", "tests", "step_time", "batch", "resume", "determinism", "compile")


def positive(row: dict, *keys) -> None:
    for key in keys:
        assert isinstance(row.get(key), numbers.Real) and row[key] > 0, (key, row)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "x.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_smoke_report_has_every_section_ok_and_prints_a_summary(smoke):
    report, printed = smoke
    assert report["smoke"] is True and tuple(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["ok"] is True and "error" not in section, (name, section)
        assert 0 <= section["seconds"] <= section["budget_s"] + 1, (name, section)
        assert f"== {name}: ok" in printed
    assert "all sections ok" in printed and report["seconds"] < 150


def test_environment_and_tests_sections(smoke):
    env, tests = smoke[0]["sections"]["environment"], smoke[0]["sections"]["tests"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["clipguide"]
    assert env["cublas_workspace_config"] == ":4096:8"
    assert {"cuda.matmul.allow_tf32", "cudnn.allow_tf32", "float32_matmul_precision"} <= set(env["matmul"])
    assert "tests/test_options.py::test_device_runs_the_loop_there_from_the_same_draws" in tests["node_ids"]
    assert "tests/test_loaders_clip.py::test_to_moves_the_cache" in tests["node_ids"]
    assert "tests/test_gpu_path.py::test_a_step_reads_the_device_once" in tests["node_ids"]  # parametrised: 6 tests
    assert tests["passed"] == tests["tests"] >= len(tests["node_ids"]) and tests["failures"] == tests["errors"] == 0


def test_step_time_and_batch_rows_have_numbers(smoke):
    sections = smoke[0]["sections"]
    rows = sections["step_time"]["rows"]
    assert {(r["preset"], r["precision"]) for r in rows} == {
        (p, q) for p in ("dvae-codebook", "vqgan-zquantize") for q in ("fp32", "bf16", "fp16-autocast")}
    for row in rows + sections["batch"]["rows"]:
        positive(row, "ms_per_step", "steps_per_s", "warmup_s")
        assert "peak_gpu_mib" in row and row["peak_gpu_mib"] is None  # the CPU has no GPU memory to report
    batch = sections["batch"]
    assert [r["batch"] for r in batch["rows"]] == [1, 2, 4]
    for row in batch["rows"]:
        assert row["images_per_s"] == pytest.approx(row["batch"] * row["steps_per_s"], rel=1e-3)
    positive(batch, "batch_4_over_4_sequential")


def test_resume_and_determinism_are_exact_on_the_cpu(smoke):
    sections = smoke[0]["sections"]
    resume = sections["resume"]
    assert resume["all_equal"] is True and len(resume["rows"]) == 6
    assert {r["deterministic"] for r in resume["rows"]} == {False, True}
    rows = sections["determinism"]["rows"]
    assert [(r["precision"], r["deterministic"]) for r in rows] == [(p, d) for p in ("fp32", "bf16") for d in (False, True)]
    for row in rows:
        assert row["images_equal"] and row["latent_equal"] and row["max_abs_image_diff"] == 0
        positive(row, "seconds_per_run")
    for row in rows[1::2]:
        positive(row, "cost_vs_default")


def test_compile_section_measures_or_says_why_not(smoke):
    from clipguide import RunConfig

    compiled = smoke[0]["sections"]["compile"]
    if "compile" not in RunConfig.__dataclass_fields__:
        assert "no `compile` field" in compiled["skipped"] and "rows" not in compiled
        return
    assert compiled["rows"] and all(isinstance(r["graphs_compiled"], int) for r in compiled["rows"])
    for row in compiled["rows"]:
        positive(row, "ms_per_step", "steps_per_s")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_without_cuda_and_smoke_it_refuses_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and not (tmp_path / "x.json").exists()
    assert len(r.stderr.strip().splitlines()) == 1 and "CUDA is not available" in r.stderr
