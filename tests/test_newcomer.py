"""A newcomer's first hour (issue 30): start-up, Ctrl-C while loading, --help, warnings, devices."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import clipguide
from clipguide.cli import main
from clipguide.commands import build_parser, busy_cores, short_value, thread_note
from clipguide.config import GROUPS, RunConfig
from clipguide.engine.devices import check_device, resolve_device
from clipguide.errors import ConfigError
from clipguide.run.generation import make_config, vocabulary_note
from clipguide.presets import DEFAULT_PRESET, get_preset

CONSOLE_SCRIPT = "import sys; from clipguide.cli import main; sys.exit(main())"  # what pip's `clipguide` script runs


@pytest.fixture
def small(tiny_model_files):
    dec, clip = tiny_model_files
    return ["--decoder", str(dec), "--clip", str(clip), "--size", "32", "--cutn", "2", "--preset", "shapes"]


def test_import_loads_no_torch_and_keeps_the_exported_functions():
    code = ("import sys, clipguide; assert 'torch' not in sys.modules, 'import clipguide loaded torch'; "
            "import clipguide.engine.loop, clipguide.run.replay, clipguide.run.generation; "
            "assert callable(clipguide.optimise) and callable(clipguide.replay), 'a submodule shadowed a function'; "
            "print(clipguide.optimise.__module__, clipguide.replay.__module__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["clipguide.engine.loop", "clipguide.run.replay"]
    assert set(clipguide.__all__) <= set(dir(clipguide))
    assert all(getattr(clipguide, name) is not None for name in clipguide.__all__)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/PID/maps to catch torch loading")
def test_ctrl_c_while_torch_loads_is_one_line_and_130(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", CONSOLE_SCRIPT, "generate", "x", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # interrupt as soon as torch's library is being loaded
        try:
            if "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text():
                break
        except OSError:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert err.strip() == "clipguide: interrupted", err
    assert not out.exists()


def test_bad_size_is_refused_before_anything_is_printed_or_created(capsys, small, tmp_path):
    out = tmp_path / "run"
    assert main(["generate", "x", *small, "--size", "36", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--size 36" in err and "use 32 or 40" in err, err
    assert not out.exists()


def test_help_groups_the_flags_and_shows_the_default_presets_values():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = sub.choices["generate"].format_help()
    defaults = get_preset(DEFAULT_PRESET)
    for title in GROUPS.values():
        assert f"\n{title}:\n" in text, title
    assert "[preset]" not in text
    assert f"[{defaults.steps}]" in text and f"[{short_value(defaults.prior_candidates)}]" in text  # the default's own values
    titles = [line for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    section = {t: text.split(t, 1)[1].split("\n\n", 1)[0] for t in titles}
    assert "--cut-flip" in section[GROUPS["cutouts"] + ":"] and "--threads" in section[GROUPS["speed"] + ":"]
    assert "--lr " in section[GROUPS["optimisation"] + ":"] and "--out " in section[GROUPS["output"] + ":"]


def test_out_of_vocabulary_words_are_named():
    note = vocabulary_note(make_config(["a red circle on a blue background", "a cat on a red backgrund"]))
    assert "'cat', 'backgrund'" in note and "red, orange" in note and "circle, square, triangle" in note
    assert vocabulary_note(make_config("a red circle on a blue background | a green square:-0.5")) is None
    assert vocabulary_note(make_config("Red circle, blue background.")) is None
    assert "'kitten'" in vocabulary_note(make_config("image:x.png | kitten:0.5"))  # only text targets count
    assert vocabulary_note(make_config("a cat", clip="ViT-B-32/openai")) is None  # its vocabulary is open


def test_the_cli_warns_in_one_line(capsys, tmp_path):
    assert main(["generate", "a cat", "--preset", "shapes", "--steps", "1", "--cutn", "2", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len([w for w in warnings if "'cat'" in w]) == 1, warnings


def test_busy_machine_hint():
    busy = busy_cores(0.05)
    assert busy is None or 0 <= busy <= os.cpu_count() + 1e-9
    threads = torch.get_num_threads()
    assert thread_note("cuda", load=50.0, cores=2) is None
    assert thread_note("cpu", load=0.1, cores=threads) is None
    if threads > 1:
        note = thread_note("cpu", load=threads + 1.0, cores=threads)
        assert "--threads 1" in note and "OMP_NUM_THREADS=1" in note


def test_banner_names_device_and_threads(capsys, small, tmp_path):
    assert main(["generate", "x", *small, "--steps", "1", "--threads", "1", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    banner = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("clipguide: preset"))
    assert "on cpu, 1 thread(s)" in banner and "candidates" not in banner, banner
    # with a prior's proposals (the default's 512 and 80 completions; 4 and 2 x 5 here), the banner says
    # what the first seconds are spent on, and which CLIP rates them when it is not the run's own
    assert main(["generate", "a red circle", "--prior-candidates", "4", "--prior-shortlist", "2", "--prior-resample", "1",
                 "--prior-clip", "shapes", "--steps", "1", "--threads", "1", "--out", str(tmp_path / "p"), "--quiet"]) == 0
    banner = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("clipguide: preset"))
    assert "preset shapes-rerank" in banner, banner
    assert "1 run(s) x 4 candidates from shapes-prior and 10 completions rated by shapes then 1 steps" in banner, banner


def test_device_auto_resolves_and_the_manifest_records_the_device_used(monkeypatch, small, tmp_path, capsys):
    assert RunConfig().device == "auto" and all(get_preset(n).device == "auto" for n in clipguide.PRESETS)
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.undo()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            check_device("cuda")
        assert check_device("auto") in ("cpu", "mps")
    out = tmp_path / "r"
    assert main(["generate", "x", *small, "--steps", "1", "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["device"] == resolve_device("auto")


def test_snapshotter_describes_the_models_itself_and_refuses_a_wrong_description(tiny_dvae, tiny_clip, tmp_path):
    cfg = RunConfig(prompts=("x",), steps=2, size=32, cutn=2, device="cpu")
    saver = clipguide.Snapshotter(tmp_path / "a", cfg)
    result = clipguide.optimise(cfg, tiny_dvae, tiny_clip, [saver])
    saver.finish(result)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["models"] == json.loads(json.dumps(result.models))
    assert manifest["models"]["decoder"]["name"] == tiny_dvae.name and manifest["models"]["clip"]["name"] == tiny_clip.name
    wrong = clipguide.Snapshotter(tmp_path / "b", cfg, {})
    with pytest.raises(ConfigError, match="leave models out"):
        clipguide.optimise(cfg, tiny_dvae, tiny_clip, [wrong])
