"""Blending and lineage: `clipguide blend`, `generate --from`, parents in manifests, lineage trees."""

import hashlib
import io
import json

import pytest
from PIL import Image

from clipguide.cli import main
from clipguide.records.lineage import draw_lineage, final_image, format_lineage, lineage

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small(tiny_model_files):
    dec, clip = tiny_model_files
    return ["--decoder", str(dec), "--clip", str(clip), "--size", "32", "--cutn", "2", "--steps", "2", "--quiet", "--preset", "shapes"]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(run_dir) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.fixture
def photo(tmp_path):
    """An image clipguide did not make."""
    path = tmp_path / "photo.png"
    Image.new("RGB", (48, 40), (30, 70, 220)).save(path)
    return path


def test_blend_and_from_record_parents_and_lineage_walks_back_two_generations(small, tmp_path, photo, capsys):
    a, b, c = (tmp_path / n for n in "abc")
    assert main(["generate", "a red circle", *small, "--out", str(a)]) == 0
    assert main(["generate", "--from", str(a), *small, "--out", str(b)]) == 0  # continues a's prompt from its image
    a_img, b_img = final_image(a), final_image(b)
    assert a_img == a / "step_000002.png"
    run_b = manifest(b)["runs"][0]
    assert run_b["prompt"] == "a red circle"
    init = {"role": "init_image", "source": str(a_img), "file": str(a_img.resolve()), "sha256": sha256(a_img)}
    assert run_b["parents"] == [init]
    assert main(["blend", str(b_img), f"{photo}:0.5", "--text", "blue:-0.5", *small, "--out", str(c)]) == 0
    run_c = manifest(c)["runs"][0]
    assert run_c["prompt"] == f"image:{b_img} | image:{photo}:0.5 | blue:-0.5"
    assert [(p["role"], p["sha256"]) for p in run_c["parents"]] == [("image_prompt", sha256(b_img)),
                                                                      ("image_prompt", sha256(photo))]

    tree = lineage(c)
    assert [(d, n.role) for d, n in tree.walk()] == [(0, "run"), (1, "image_prompt"), (2, "init_image"), (1, "image_prompt")]
    b_node, photo_node = tree.parents
    assert (b_node.run_dir, b_node.prompt, b_node.status) == (str(b.resolve()), "a red circle", "ok")
    assert b_node.parents[0].run_dir == str(a.resolve()) and b_node.parents[0].parents == []
    assert photo_node.run_dir is None and photo_node.status == "ok"

    out = draw_lineage(c, tmp_path / "tree.png")
    with Image.open(out) as im:
        assert im.width >= 2 * 96 and im.height >= 3 * 96  # two leaves wide, three generations high
    capsys.readouterr()
    assert main(["lineage", str(c)]) == 0
    assert capsys.readouterr().out.count("\n") == 4


def test_lineage_flags_a_parent_changed_since_and_finds_moved_runs(small, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["generate", "a red circle", *small, "--batch", "2", "--out", str(a)]) == 0
    assert main(["generate", "blue", "--from", str(a / "run_01"), *small, "--out", str(b)]) == 0
    parent = lineage(b).parents[0]
    assert (parent.run, parent.image) == (1, str((a / "run_01" / "step_000002.png").resolve()))
    Image.new("RGB", (32, 32)).save(a / "run_01" / "step_000002.png")  # overwritten: no provenance any more
    parent = lineage(b).parents[0]
    assert parent.status == "modified" and parent.run == 1  # found through the manifest beside it
    assert "[modified]" in format_lineage(lineage(b))


def one_line_error(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and all(n in err for n in needles), err


def test_prompt_and_image_errors_are_one_line_exit_2(small, tmp_path, capsys, photo):
    out = ["--out", str(tmp_path / "r")]
    one_line_error(capsys, ["generate", "a red circle | blue:1x", *small, *out], "»1x«", "not a number")
    one_line_error(capsys, ["generate", "a::1 b::-1", *small, *out], "sum to 0")
    one_line_error(capsys, ["generate", "a:0", *small, *out], "add up to zero")
    one_line_error(capsys, ["generate", "a ^ b", *small, *out], "--story-every")
    one_line_error(capsys, ["blend", str(photo), "missing.png:0.5", *small, *out], "»missing.png«", "does not exist")
    one_line_error(capsys, ["blend", "http://127.0.0.1:9/x.png", *small, *out], "cannot be read", "»http://127.0.0.1:9/x.png«")
    one_line_error(capsys, ["generate", "x", "--init-image", "nope.png", *small, *out], "--init-image 'nope.png' does not exist")
    one_line_error(capsys, ["generate", *small, *out], "no prompt given")
    one_line_error(capsys, ["generate", "x", "--from", str(tmp_path), *small, *out], "not a clipguide run directory")
    assert not (tmp_path / "r").exists()  # nothing started, nothing left behind


def test_from_refuses_ambiguous_runs_and_double_inits(small, tmp_path, capsys, photo):
    a = tmp_path / "a"
    assert main(["generate", "a red circle", *small, "--batch", "2", "--out", str(a)]) == 0
    capsys.readouterr()
    out = ["--out", str(tmp_path / "r")]
    one_line_error(capsys, ["generate", "x", "--from", str(a), *small, *out], "holds 2 runs", "run_00")
    one_line_error(capsys, ["generate", "x", "--from", str(a / "run_00"), "--init-image", str(photo), *small, *out],
                   "drop --init-image")


def test_image_bytes_are_hashed_as_read(tmp_path):
    from clipguide.records.images import decode_image, sha256_of

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buf.getvalue())
    assert sha256_of(str(path)) == hashlib.sha256(buf.getvalue()).hexdigest()
    assert decode_image(buf.getvalue(), "x").size == (4, 4)


def test_init_image_step_0_resembles_the_init_image(shapes_models, tmp_path):
    """Crowson's init_image on the shapes dVAE: the first image is the encoder's reconstruction."""
    from clipguide import get_preset, optimise
    from clipguide.shapes.scenes import Scene, render, to_tensor

    scene = Scene("yellow", "square", "black", 0.45, 0.55, 0.5)
    Image.fromarray(render(scene, 128)[0]).save(tmp_path / "init.png")
    decoder, clip = shapes_models
    cfg = get_preset("shapes").replace(prompts=("a red circle",), size=64, steps=1, snapshots=(0,))
    started = optimise(cfg.replace(init_image=str(tmp_path / "init.png")), decoder, clip).snapshots[0]
    random = optimise(cfg, decoder, clip).snapshots[0]
    target = to_tensor(render(scene, 64))
    mse = [float((x - target).pow(2).mean()) for x in (started, random)]
    assert mse[0] < mse[1] / 5  # measured: 0.002-0.012 vs 0.26-0.35
