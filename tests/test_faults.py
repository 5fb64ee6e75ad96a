"""Faults: SIGKILL at a random step then resume, Ctrl-C then resume, a full disk (a failing writer
in process, and a real tiny tmpfs where this machine allows one). After each, every PNG and JSON
in the run directory must be whole, and the resumed run must equal an uninterrupted one."""

import errno
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipguide.records import files
from clipguide.records.checkpoints import FILENAME, read_checkpoint
from clipguide.cli import main

# The shapes world at 64 px: about 0.1 s a step on one thread.
CMD = ["generate", "a red circle on a blue background", "--preset", "shapes", "--size", "64", "--cutn", "4", "--steps", "24",
       "--snapshots", "6,12,18", "--checkpoint-every", "2", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread, as this process
# The kill steps are drawn from this seed, so that a failure replays: CLIPGUIDE_FAULT_SEED=N pytest ... draws others.
SEED = int(os.environ.get("CLIPGUIDE_FAULT_SEED", "20240607"))


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "clipguide.cli", *args]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run.  Every run here is a fresh process, as a user's would be: within one
    process, CLIP's cache of text embeddings keeps the first encoding of a text, whose last bits
    depend on the texts it was encoded with, so in-process results depend on earlier tests."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    p = subprocess.run(cli(*CMD, "--out", str(out)), env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return out


def header_step(path: Path) -> int:
    """The step of a checkpoint, from its header only (-1 while there is none)."""
    try:
        data = path.read_bytes()
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        return json.loads(header["__metadata__"]["clipguide"])["step"]
    except (OSError, ValueError, KeyError):
        return -1


def run_until(out: Path, step: int, sig, args=None) -> subprocess.CompletedProcess:
    """Start a run, send ``sig`` once its checkpoint reaches ``step``, return how it ended."""
    proc = subprocess.Popen(args or cli(*CMD, "--out", str(out)), env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while header_step(out / FILENAME) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def assert_whole(out: Path) -> None:
    """No truncated PNG or JSON: every visible one opens completely."""
    for png in out.rglob("[!.]*.png"):
        with Image.open(png) as im:
            im.load()
    for js in out.rglob("[!.]*.json"):
        json.loads(js.read_text())
    read_checkpoint(out / FILENAME)


def assert_same_outputs(out: Path, reference: Path) -> None:
    """Every snapshot of the reference run, pixel for pixel, with the same recorded loss."""
    ref, got = (json.loads((d / "manifest.json").read_text()) for d in (reference, out))
    listed = {(s["run"], s["step"]): s for s in got["snapshots"]}
    for snap in ref["snapshots"]:
        mine = listed[(snap["run"], snap["step"])]
        assert (mine["file"], mine["loss"], mine["clip_similarity"]) == (snap["file"], snap["loss"], snap["clip_similarity"])
        a, b = (np.asarray(Image.open(d / snap["file"])) for d in (reference, out))
        assert np.array_equal(a, b), snap["file"]
    assert got["steps_done"] == ref["steps_done"] and not got["interrupted"]
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"


def resume(out: Path) -> str:
    """Resume in a fresh process; its stderr."""
    p = subprocess.run(cli("resume", str(out), "--quiet"), env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stderr


def test_sigkill_at_a_random_step_then_resume(reference, tmp_path):
    target = random.Random(SEED).randrange(2, 17, 2)
    replay = f"kill at checkpoint step {target} (CLIPGUIDE_FAULT_SEED={SEED})"
    print(replay)  # shown with any failure below
    out = tmp_path / "run"
    killed = run_until(out, target, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, f"{replay}: {killed.stderr}"
    assert_whole(out)
    kept = read_checkpoint(out / FILENAME).step
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["step"] for s in manifest["snapshots"]} >= {s for s in (6, 12, 18) if s <= kept}, f"a snapshot was lost: {replay}"
    assert f"at step {kept} of 24" in resume(out), replay
    assert_same_outputs(out, reference)


def test_ctrl_c_writes_a_final_snapshot_and_checkpoint_then_resumes(reference, tmp_path):
    out = tmp_path / "run"
    stopped = run_until(out, 8, signal.SIGINT)
    assert stopped.returncode == 130 and "clipguide resume" in stopped.stderr, stopped.stderr
    assert_whole(out)
    manifest = json.loads((out / "manifest.json").read_text())
    done = manifest["steps_done"]
    assert manifest["interrupted"] and done >= 8 and (out / f"step_{done:06d}.png").exists()
    assert read_checkpoint(out / FILENAME).step == done, "Ctrl-C should checkpoint the step it stopped at"
    assert f"at step {done} of 24" in resume(out)
    assert_same_outputs(out, reference)


@pytest.mark.slow
def test_many_random_kills_lose_nothing(reference, tmp_path):
    out, rng, targets = tmp_path / "run", random.Random(SEED), []
    args = cli(*CMD, "--out", str(out))
    for _ in range(12):
        targets.append(header_step(out / FILENAME) + rng.randrange(2, 9, 2))
        print(f"kill at checkpoint step {targets[-1]} (CLIPGUIDE_FAULT_SEED={SEED})")  # shown with any failure
        ended = run_until(out, targets[-1], signal.SIGKILL, args)
        if ended.returncode == 0:
            break
        assert ended.returncode == -signal.SIGKILL, f"kills at {targets} (CLIPGUIDE_FAULT_SEED={SEED}): {ended.stderr}"
        assert_whole(out)
        args = cli("resume", str(out), "--quiet")
    else:
        resume(out)
    assert_same_outputs(out, reference)


# ----------------------------------------------------------------------------- full disk


class _Proxy:
    """A module with some attributes replaced."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


class _Filling:
    """A file whose disk fills up after ``room`` more bytes."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        data = bytes(data)
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class FullDisk:
    """clipguide's writes fill the disk during the ``nth`` write of a file named ``name``."""

    def __init__(self, monkeypatch, name: str, nth: int, room: int = 100):
        self.name, self.nth, self.room, self.seen, self.paths = name, nth, room, 0, {}
        monkeypatch.setattr(files, "tempfile", _Proxy(tempfile, mkstemp=self.mkstemp))
        monkeypatch.setattr(files, "os", _Proxy(os, fdopen=self.fdopen))

    def mkstemp(self, **kw):
        fd, path = tempfile.mkstemp(**kw)
        self.paths[fd] = Path(path).name
        return fd, path

    def fdopen(self, fd, mode):
        f = os.fdopen(fd, mode)
        if self.paths.pop(fd).startswith(f".{self.name}."):
            self.seen += 1
            if self.seen == self.nth:
                return _Filling(f, self.room)
        return f


FREE = "free some disk space (the previous files are intact; clipguide resume RUN_DIR continues a run)"
HINTS = {
    errno.ENOSPC: FREE,
    getattr(errno, "EDQUOT", errno.ENOSPC): FREE,
    errno.EROFS: "make the directory writable or choose another --out",
    errno.EACCES: "make the directory writable or choose another --out",
    errno.EIO: "check the disk (the previous files are intact)",
}


@pytest.mark.parametrize("code", HINTS, ids=errno.errorcode.get)
def test_a_failed_write_names_the_file_its_error_and_the_fix(tmp_path, code):
    path = tmp_path / "manifest.json"
    path.write_text("the previous manifest")

    def fail(f):
        f.write(b"half a manifest")
        raise OSError(code, os.strerror(code))

    with pytest.raises(files.OutputError) as err:
        files.atomic_write(path, fail)
    assert str(err.value) == f"cannot write {path} ({os.strerror(code)}): {HINTS[code]}"
    assert path.read_text() == "the previous manifest" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_write_interrupted_otherwise_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "step_000001.png"

    def interrupted(f):
        f.write(b"half a PNG")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # not turned into an OutputError
        files.atomic_write(path, interrupted)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_cmd(tiny_model_files):
    dec, clip = tiny_model_files
    return ["generate", "a red circle", "--preset", "shapes", "--decoder", str(dec), "--clip", str(clip), "--size", "32", "--cutn", "2",
            "--steps", "10", "--snapshots", "2,4,6,8", "--checkpoint-every", "2", "--quiet"]


@pytest.fixture(scope="module")
def tiny_reference(tiny_cmd, tmp_path_factory):
    out = tmp_path_factory.mktemp("disk") / "reference"
    assert main([*tiny_cmd, "--out", str(out)]) == 0
    return out


# (file that fills the disk, its nth write, what must survive): checkpoints at 0, 2, 4..., manifests from step 0
FULL = {"checkpoint": (FILENAME, 3, 2), "snapshot": ("step_000006.png", 1, 4), "manifest": ("manifest.json", 4, 4)}


@pytest.mark.parametrize("which", FULL)
def test_full_disk_is_one_line_and_keeps_the_previous_files(which, tiny_cmd, tiny_reference, tmp_path, monkeypatch, capsys):
    name, nth, kept = FULL[which]
    out = tmp_path / "run"
    disk = FullDisk(monkeypatch, name, nth)
    rc = main([*tiny_cmd, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert disk.seen == nth and rc == 2, err
    assert err[-1].startswith("clipguide: error: cannot write ") and str(out / name) in err[-1], err
    assert "No space left on device" in err[-1] and "previous files are intact" in err[-1], err
    assert not list(out.rglob(".*.tmp")), "the half-written temporary file was left behind"
    assert_whole(out)
    assert read_checkpoint(out / FILENAME).step == kept
    monkeypatch.undo()  # space freed
    assert main(["resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert_same_outputs(out, tiny_reference)


@pytest.mark.slow
def test_a_real_full_tmpfs(reference, tmp_path):
    """ENOSPC from a real 700 KiB tmpfs (mounted in a user namespace): the second checkpoint does not fit.
    (The default suite fills the disk with a failing writer instead.)"""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged user namespaces here to mount a tiny tmpfs in")
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    run = disk / "run"
    generate = shlex.join(cli(*CMD, "--out", str(run)))
    script = f"mount -t tmpfs -o size=700k tmpfs {disk} && {generate}; echo rc=$?; cp -a {run} {copy}"
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    last = p.stderr.strip().splitlines()[-1]
    assert "rc=2" in p.stdout and last.startswith("clipguide: error: cannot write"), p.stdout + p.stderr
    assert str(run / FILENAME) in last and "No space left on device" in last, last
    assert not list(copy.rglob(".*.tmp"))
    assert_whole(copy)
    assert read_checkpoint(copy / FILENAME).step == 0
    resume(copy)
    assert_same_outputs(copy, reference)
