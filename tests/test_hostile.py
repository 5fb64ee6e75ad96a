"""Hostile inputs: a pickle that would run code, for every loader; decompression bombs and truncated
images as prompts; prompts and manifests that try to point writes or reads outside the run."""

import json
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from clipguide import ClipguideError, Snapshotter, get_preset, load_clip, load_decoder
from clipguide.records.checkpoints import FILENAME, read_checkpoint
from clipguide.cli import main
from clipguide.commands import default_out
from clipguide.paths import PACKAGE_DIR
from clipguide.records.manifest import read_manifest
from clipguide.records.files import save_json


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file appearing proves code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def torch_payload(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": Payload(marker)}, path)
    return path


def raw_payload(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=2))
    return path


def crafted(write, name: str, load):
    """A loader case: the crafted file ``name`` and how to load it."""
    def make(tmp: Path, marker: Path):
        path = write(tmp / name, marker)
        return lambda: load(path), path
    return make


def shipped_json_with_payload(name: str, loader):
    """A shipped shapes model's .json beside a pickle named like its .safetensors."""
    def make(tmp: Path, marker: Path):
        shutil.copy(PACKAGE_DIR / "shapes" / "models" / f"{name}.json", tmp / f"{name}.json")
        return lambda: loader(str(tmp / f"{name}.json")), raw_payload(tmp / f"{name}.safetensors", marker)
    return make


def taming_with_payload(tmp: Path, marker: Path):
    from test_vqgan import TINY, vq_params, write_yaml

    yaml = write_yaml(tmp / "evil.yaml", "taming.models.vqgan.VQModel", vq_params(TINY))
    return lambda: load_decoder(str(yaml)), torch_payload(tmp / "evil.ckpt", marker)


LOADERS = {
    "dVAE decoder.pkl (torch zip)": crafted(torch_payload, "decoder.pkl", lambda p: load_decoder(str(p))),
    "dVAE decoder.pkl (raw pickle)": crafted(raw_payload, "decoder.pkl", lambda p: load_decoder(str(p))),
    "taming .ckpt": taming_with_payload,
    "open_clip .pt": crafted(torch_payload, "evil.pt", lambda p: load_clip(f"ViT-B-32/{p}")),
    "open_clip .safetensors": crafted(raw_payload, "evil.safetensors", lambda p: load_clip(f"ViT-B-32/{p}")),
    "shapes dVAE": shipped_json_with_payload("shapes-dvae", load_decoder),
    "shapes VQGAN": shipped_json_with_payload("shapes-vqgan", load_decoder),
    "shapes CLIP": shipped_json_with_payload("shapes-clip", load_clip),
    "resume checkpoint": crafted(raw_payload, FILENAME, read_checkpoint),
}


def test_payload_is_live(tmp_path):
    """The control: plain unpickling does run it."""
    marker = tmp_path / "pwned"
    pickle.loads(raw_payload(tmp_path / "x.pkl", marker).read_bytes())["w"].close()
    assert marker.exists()


@pytest.mark.parametrize("loader", LOADERS)
def test_every_loader_refuses_a_code_running_pickle(tmp_path, loader):
    marker = tmp_path / "pwned"
    load, path = LOADERS[loader](tmp_path, marker)
    with pytest.raises(Exception) as err:
        load()
    assert not marker.exists(), "the pickle ran code"
    assert isinstance(err.value, ClipguideError), repr(err.value)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_resume_of_a_pickled_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = get_preset("shapes").replace(prompts=("x",), steps=3)
    saver = Snapshotter(run, cfg, {"decoder": {"name": "t"}, "clip": {"name": "t"}})
    save_json(run / "manifest.json", saver.manifest)
    raw_payload(run / FILENAME, tmp_path / "pwned")
    assert main(["resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run / FILENAME) in err and not (tmp_path / "pwned").exists(), err


def test_absurd_checkpoint_headers_are_refused(tmp_path):
    path = tmp_path / FILENAME
    for data in (struct.pack("<Q", 2**62) + b"{}", struct.pack("<Q", 200_000) + b"[" * 200_000, b"\x00" * 7):
        path.write_bytes(data)
        with pytest.raises(ClipguideError, match="corrupt"):
            read_checkpoint(path)


# ----------------------------------------------------------------------------- images


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 100_000) -> bytes:
    """A 100 000 x 100 000 RGB PNG header with almost no data: 10^10 pixels on paper."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + png_chunk(b"IEND", b""))


@pytest.fixture
def tiny_flags(tiny_model_files):
    dec, clip = tiny_model_files
    return ["--decoder", str(dec), "--clip", str(clip), "--size", "32", "--cutn", "2", "--steps", "1", "--quiet", "--preset", "shapes"]


@pytest.fixture
def bad_images(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), "red").save(good, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {"bomb": (bomb, "MAX_IMAGE_PIXELS"), "truncated": (cut, "truncated or corrupt")}


@pytest.mark.parametrize("image", ["bomb", "truncated"])
@pytest.mark.parametrize("use", ["image prompt", "blend", "init image"])
def test_bombs_and_truncated_images_are_refused_on_one_line(bad_images, tiny_flags, tmp_path, capsys, image, use):
    path, needle = bad_images[image]
    out = ["--out", str(tmp_path / "run")]
    argv = {"image prompt": ["generate", f"a red circle | image:{path}:0.5"], "blend": ["blend", str(path)],
            "init image": ["generate", "a red circle", "--init-image", str(path)]}[use]
    assert main([*argv, *tiny_flags, *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and needle in err[-1] and str(path) in err[-1], err  # (the first line names the models)


def test_truncated_images_are_never_padded():
    import importlib

    for module in ("clipguide", "clipguide.audit.classification", "clipguide.models.vqgan", "clipguide.shapes.train"):
        importlib.import_module(module)  # with everything they import (open_clip, taming, ...)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ----------------------------------------------------------------------------- paths


HOSTILE = ["../../escape", "/etc/passwd", "..", "a/../../b", "C:\\Windows\\x", "~/.ssh/x", "run_00/../..", "\u202e../x", "./."]


@pytest.mark.parametrize("prompt", HOSTILE)
def test_default_run_dir_stays_under_runs(prompt):
    out = default_out(prompt)
    assert out.parent == Path("runs") and out.name.replace("-", "").isalnum(), out


def test_a_path_like_prompt_writes_only_inside_its_run_dir(tiny_flags, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["generate", "../../escape", "a/../../b", *tiny_flags]) == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    (run,) = (cwd / "runs").iterdir()
    assert written and all(run in p.parents for p in written), written
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors", "contact_sheet.png", "manifest.json",
                                                     "run_00", "run_01"]


@pytest.mark.parametrize("field,value", [
    ("file", "../../outside.png"), ("file", "/etc/passwd"), ("file", "C:/x.png"), ("file", "..\\..\\x.png"),
    ("file", "a/../../x.png"), ("dir", "../elsewhere"), ("run", 7), ("step", -1), ("file", None),
])
def test_manifest_pointing_outside_the_run_is_refused(tmp_path, field, value):
    run = tmp_path / "run"
    cfg = get_preset("shapes").replace(prompts=("x",), steps=3)
    saver = Snapshotter(run, cfg, {"decoder": {"name": "t"}})
    saver.save(1, torch.zeros(1, 3, 8, 8))
    manifest = json.loads((run / "manifest.json").read_text())
    target = manifest["runs"][0] if field == "dir" else manifest["snapshots"][0]
    target[field] = value
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ClipguideError) as err:
        read_manifest(run)
    assert str(run / "manifest.json") in str(err.value) and "corrupt" in str(err.value)


def huge_manifest(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "manifest.json", "wb") as f:
        f.truncate(64 * 2**20 + 1)  # sparse: nothing is written, and nothing must be read
    return run


def test_a_huge_manifest_is_refused_on_one_line(tmp_path, monkeypatch):
    huge_manifest(tmp_path)
    monkeypatch.chdir(tmp_path)  # a short path: the message below keeps its words whatever the temporary folder
    with pytest.raises(ClipguideError) as err:
        read_manifest("run")
    message = str(err.value)
    assert message.startswith("manifest run/manifest.json ") and "larger than 64 MiB" in message, message
    assert "\n" not in message


def test_a_huge_manifest_is_named_as_too_large(tmp_path):
    run = huge_manifest(tmp_path)
    with pytest.raises(ClipguideError) as err:
        read_manifest(run)
    assert str(err.value) == f"manifest {run / 'manifest.json'} is larger than 64 MiB: it is not clipguide's"


def test_an_out_that_is_a_file_or_a_dangling_link_is_refused(tmp_path):
    cfg = get_preset("shapes").replace(prompts=("x",), steps=3)
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    with pytest.raises(ClipguideError) as err:
        Snapshotter(file, cfg)
    assert str(err.value) == f"--out {file} is a file, not a directory: choose another --out"
    assert file.read_text() == "keep me"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone" / "run")  # passes the checks, then cannot be created
    with pytest.raises(ClipguideError) as err:
        Snapshotter(link, cfg)
    assert str(err.value) == f"cannot write to output directory {link} (File exists): choose a writable --out"
    assert not (tmp_path / "gone").exists()
