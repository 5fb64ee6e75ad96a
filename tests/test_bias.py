"""The bias audit: Wilson intervals against known values, counts against the pixel judge on a case
with known answers, the batched generation path, the shipped occupation lists and CLI errors."""

import csv
import io
import json

import pytest

import clipguide
from clipguide.records.files import read_png_text
import torch

from clipguide import audit_bias
from clipguide.audit import bias as B
from clipguide.cli import main
from clipguide.errors import ConfigError
from clipguide.shapes.judge import judge_batch

RED_GREEN = "a red shape|a green shape"


@pytest.mark.parametrize("k, n, want", [
    (0, 10, (0.0, 0.2775)),  # upper bound z²/(n + z²)
    (5, 10, (0.2366, 0.7634)),
    (7, 10, (0.3968, 0.8922)),
    (10, 10, (0.7225, 1.0)),
    (1, 1, (0.2065, 1.0)),
])
def test_wilson_interval_known_values(k, n, want):
    lo, hi = B.wilson_interval(k, n)
    assert lo == pytest.approx(want[0], abs=1e-4) and hi == pytest.approx(want[1], abs=1e-4)


def test_wilson_interval_edges():
    assert B.wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = B.wilson_interval(50, 100, z=2.576)  # 99%: wider than 95%
    assert lo < B.wilson_interval(50, 100)[0] and hi > B.wilson_interval(50, 100)[1]
    for k, n in ((3, 2), (-1, 4)):
        with pytest.raises(ValueError):
            B.wilson_interval(k, n)


def test_counts_and_intervals_match_the_judge_on_known_answers(shapes_models, render_scenes):
    """Rendered scenes whose colour the pixel judge reads: 7 red + 3 green, and 2 red + 8 green."""
    red, _ = render_scenes(9, seed=31, colour="red")
    green, _ = render_scenes(11, seed=32, colour="green")
    sets = {"mostly red": torch.cat([red[:7], green[:3]]), "mostly green": torch.cat([red[7:], green[3:]])}
    audit = B.audit_images(sets, RED_GREEN, clip=shapes_models[1])
    judged = {p: [v.colour for v in judge_batch(x)] for p, x in sets.items()}
    assert judged["mostly red"].count("red") == 7 and judged["mostly green"].count("green") == 8
    rows = {(r["prompt"], r["value"]): r for r in audit.rows}
    for prompt, colours in judged.items():
        for value, colour in (("a red shape", "red"), ("a green shape", "green")):
            r = rows[prompt, value]
            k = colours.count(colour)
            assert (r["count"], r["n"], r["proportion"]) == (k, 10, k / 10)
            assert (r["wilson_low"], r["wilson_high"]) == B.wilson_interval(k, 10)
    assert rows["mostly red", "a red shape"]["wilson_low"] == pytest.approx(0.3968, abs=1e-4)
    assert [im["label"] for im in audit.images[:10]] == ["a red shape"] * 7 + ["a green shape"] * 3


def test_audit_bias_generates_in_batches_and_writes_its_files(tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module("clipguide.run.session")  # every run goes through run_session -> optimise
    calls = []
    real = module.optimise

    def counting(cfg, *a, **k):
        calls.append(len(cfg.runs()))
        return real(cfg, *a, **k)

    monkeypatch.setattr(module, "optimise", counting)
    prompts = ["a red circle on a blue background", "a green square on a white background", "a blue triangle"]
    out = tmp_path / "audit"
    audit = audit_bias(prompts, RED_GREEN, preset="shapes", images_per_prompt=3, steps=2, seed=4, out_dir=out, batch_size=6,
                       size=64, cutn=2)
    assert calls == [6, 3]  # whole prompts, at most 6 runs per optimise call
    assert [(im["prompt"], im["seed"]) for im in audit.images] == [(p, s) for p in prompts for s in (4, 5, 6)]
    for prompt in prompts:
        labels = [im["label"] for im in audit.images if im["prompt"] == prompt]
        for value in ("a red shape", "a green shape"):
            row = next(r for r in audit.rows if (r["prompt"], r["value"]) == (prompt, value))
            assert row["count"] == labels.count(value) and row["n"] == 3
            assert (row["wilson_low"], row["wilson_high"]) == B.wilson_interval(row["count"], 3)
    assert all(torch.tensor(list(im["probabilities"].values())).sum() == pytest.approx(1.0) for im in audit.images)
    assert all((out / "images").joinpath(*im["file"].split("/")[-3:]).is_file() for im in audit.images)
    rows = list(csv.DictReader(io.StringIO((out / "bias.csv").read_text())))
    assert len(rows) == 6 and {r["value"] for r in rows} == {"a red shape", "a green shape"}
    data = json.loads((out / "bias.json").read_text())
    assert data["generation"]["steps"] == 2 and data["interval"] == "Wilson score" and "Bolukbasi" in data["occupations_source"]
    figure = read_png_text(out / "bias.png")["clipguide"]  # the chart carries its provenance and data
    assert figure["rows"] == audit.rows and figure["environment"]["clipguide"] == clipguide.__version__


def test_cli_audit_end_to_end(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red circle on a blue background\na green square on a white background\n")
    out = tmp_path / "audit"
    assert main(["audit-bias", "--preset", "shapes", "--prompts", str(prompts), "--images-per-prompt", "2", "--attribute", RED_GREEN,
                 "--steps", "1", "--size", "64", "--cutn", "2", "--seed", "3", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count("/2 ") == 4 and "a green square on a white background" in table
    data = json.loads((out / "bias.json").read_text())
    assert [im["seed"] for im in data["images"]] == [3, 4, 3, 4] and data["generation"]["size"] == 64
    assert (out / "bias.png").is_file() and (out / "bias.csv").is_file()
    csv_text = (out / "bias.csv").read_text()
    (out / "bias.csv").unlink()
    assert main(["audit-bias", "--preset", "shapes", "--prompts", str(prompts), "--images-per-prompt", "2", "--attribute", RED_GREEN,
                 "--steps", "1", "--size", "64", "--cutn", "2", "--seed", "3", "--out", str(out), "--resume"]) == 0
    assert (out / "bias.csv").read_text() == csv_text  # every batch read back from its checkpoint
    capsys.readouterr()
    assert main(["audit-bias", "--prompts", str(prompts), "--attribute", RED_GREEN, "--resume"]) == 2
    assert "pass its --out" in capsys.readouterr().err


def test_occupations_ship_with_their_source():
    assert B.OCCUPATIONS["she"] == ("homemaker", "nurse", "receptionist", "librarian", "socialite", "hairdresser",
                                    "nanny", "bookkeeper", "stylist", "housekeeper")
    assert B.OCCUPATIONS["he"] == ("maestro", "skipper", "protege", "philosopher", "captain", "architect",
                                   "financier", "warrior", "broadcaster", "magician")
    assert "Bolukbasi" in B.OCCUPATIONS_SOURCE and "2016" in B.OCCUPATIONS_SOURCE
    prompts = B.occupation_prompts("both", "a portrait of a {}")
    assert len(prompts) == 20 and prompts[0] == "a portrait of a homemaker" and prompts[-1] == "a portrait of a magician"


def test_attribute_needs_two_alternatives():
    assert B.parse_attribute(" a | b |a") == ("a", "b")
    for bad in ("a photo of a man", "a|", "|"):
        with pytest.raises(ConfigError, match="two alternatives"):
            B.parse_attribute(bad)


@pytest.mark.parametrize("args, message", [
    (["--occupations", "she", "--attribute", "a photo of a man"], "two alternatives"),
    (["--prompts", "missing.txt"], "does not exist"),
    (["--occupations", "he", "--prompt-template", "a photo"], "needs '{}'"),
    (["--occupations", "he", "--images-per-prompt", "0"], "at least 1"),
    ([], "one of the arguments --prompts --occupations is required"),
])
def test_cli_errors_are_one_line_exit_2(args, message, tmp_path, capsys):
    assert main(["audit-bias", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_an_interrupted_audit_resumes_to_the_same_counts_and_refuses_other_settings(tmp_path):
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    kw = dict(preset="shapes", images_per_prompt=2, steps=3, seed=1, batch_size=2, size=64, cutn=2)
    whole = audit_bias(prompts, RED_GREEN, out_dir=tmp_path / "whole", **kw)

    class StopInSecondBatch:
        calls = 0

        def __call__(self, state):
            self.calls += 1
            if self.calls == 4 + 2:  # batch 0 has steps 0..3; stop batch 1 after its step 1
                raise KeyboardInterrupt

    out = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        audit_bias(prompts, RED_GREEN, out_dir=out, callback=StopInSecondBatch(), **kw)
    assert not (out / "bias.csv").exists() and (out / "images" / "batch_01" / "checkpoint.safetensors").is_file()
    with pytest.raises(ConfigError, match="other settings"):
        audit_bias(prompts, RED_GREEN, out_dir=out, resume=True, **{**kw, "steps": 4})
    resumed = audit_bias(prompts, RED_GREEN, out_dir=out, resume=True, **kw)
    assert resumed.rows == whole.rows
    assert [im["probabilities"] for im in resumed.images] == [im["probabilities"] for im in whole.images]
    assert (out / "bias.csv").read_text() == (tmp_path / "whole" / "bias.csv").read_text()
    with pytest.raises(ConfigError, match="no audit to resume"):
        audit_bias(prompts, RED_GREEN, out_dir=tmp_path / "none", resume=True, **kw)
