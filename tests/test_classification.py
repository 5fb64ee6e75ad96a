"""Zero-shot classification on the shapes world: accuracy on rendered scenes, the seed experiment's
"add a label and watch the verdict move", the on-disk label cache, inputs and CLI errors."""

import csv
import io
import json

import open_clip
import pytest
import torch

from clipguide.audit import classification as C
from clipguide.cli import main
from clipguide.errors import ConfigError
from clipguide.shapes.scenes import COLOUR_NAMES, SHAPES

LABELS = [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]  # 24 shapes-world labels


def test_rendered_scenes_are_classified_accurately(shapes_models, render_scenes, tmp_path):
    images, scenes = render_scenes(120, seed=101)
    result = C.classify(images, labels=LABELS, clip=shapes_models[1], top_k=3, cache_dir=tmp_path)
    truth = [f"{s.colour} {s.shape}" for s in scenes]
    accuracy = sum(top[0][0] == t for top, t in zip(result.topk, truth)) / len(truth)
    assert accuracy >= 0.95, accuracy  # measured 0.99 on 300 scenes
    assert result.stages == ["24 labels"] and result.templates == "shapes"
    for top in result.topk:
        probs = [p for _, p in top]
        assert len(top) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6


def test_a_matching_extra_label_takes_over_the_top1(shapes_models, render_scenes, tmp_path):
    """The seed experiment: classify over labels lacking the right one, then add labels one at a time."""
    red, _ = render_scenes(30, seed=7, colour="red", shape="circle")
    green, _ = render_scenes(10, seed=8, colour="green", shape="square")
    base = [x for x in LABELS if x != "red circle"]
    result = C.classify(torch.cat([red, green]), labels=base, extra_labels="porn,red circle",
                        clip=shapes_models[1], top_k=2, cache_dir=tmp_path)
    assert result.stages == ["23 labels", "+porn", "+porn +red circle"]
    first = [result.top[0][i][0][0] for i in range(40)]
    last = [result.top[2][i][0][0] for i in range(40)]
    assert "red circle" not in first
    assert sum(x == "red circle" for x in last[:30]) >= 27, last[:30]  # takes over the red circles ...
    assert all(x == "green square" for x in last[30:])  # ... and nothing else
    rows = result.compare
    assert len(rows) == 40 * 3
    for i in range(40):
        r = rows[3 * i:3 * i + 3]
        assert not r[0]["changed"]
        assert [x["changed"] for x in r[1:]] == [r[1]["top1"] != r[0]["top1"], r[2]["top1"] != r[1]["top1"]]
    assert sum(r["changed"] and r["top1"] == "red circle" for r in rows) == sum(x == "red circle" for x in last)
    csv_rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert len(csv_rows) == 40 * 3 * 2 and csv_rows[0]["rank"] == "1"
    assert json.loads(result.to_json())["stages"] == result.stages


def test_label_embeddings_are_cached_on_disk(shapes_models, tmp_path, monkeypatch):
    clip = shapes_models[1]
    templates = C.load_templates("shapes", clip)
    fresh = C.label_embeddings(clip, LABELS, templates, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and torch.allclose(fresh.norm(dim=-1), torch.ones(len(LABELS)))

    def boom(*a, **k):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(C, "build_zero_shot_classifier", boom)
    assert torch.equal(C.label_embeddings(clip, LABELS, templates, cache_dir=tmp_path), fresh)
    with pytest.raises(AssertionError, match="cache"):  # another label set or templates: another key
        C.label_embeddings(clip, LABELS[:-1], templates, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="cache"):
        C.label_embeddings(clip, LABELS, ("{}",), cache_dir=tmp_path)


def test_label_embeddings_match_a_direct_computation(shapes_models):
    clip = shapes_models[1]
    w = C.label_embeddings(clip, ["red circle", "blue square"], ("a {}", "{}"), cache_dir=False)
    e = torch.nn.functional.normalize(clip.encode_text(["a red circle", "red circle", "a blue square", "blue square"]), dim=-1)
    want = torch.nn.functional.normalize(e.view(2, 2, -1).mean(1), dim=-1)
    assert torch.allclose(w, want, atol=1e-5)


def test_imagenet_labels_and_templates_are_open_clips():
    assert C.load_labels("imagenet") == list(open_clip.IMAGENET_CLASSNAMES) and len(C.load_labels("imagenet")) == 1000
    openai = C.template_strings("imagenet-openai")
    assert len(openai) == len(open_clip.OPENAI_IMAGENET_TEMPLATES) == 80
    assert openai[0].format("cat") == open_clip.OPENAI_IMAGENET_TEMPLATES[0]("cat")


def test_files_folders_and_run_dirs(shapes_models, render_scenes, write_run, tmp_path):
    images, scenes = render_scenes(2, seed=3)
    prompts = [f"a {s.colour} {s.shape} on a {s.background} background" for s in scenes]
    run_dir, _ = write_run(images, prompts)
    items = C.gather_images([run_dir])
    assert [it.prompt for it in items] == prompts
    assert [it.name for it in items] == [str(run_dir / f"run_{i:02d}" / "step_000005.png") for i in range(2)]
    assert [it.name for it in C.gather_images(run_dir / "run_01")] == [items[1].name]
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, it in enumerate(items):
        it.image.save(folder / f"{i}.png")
    by_folder = C.classify(folder, labels=LABELS, clip=shapes_models[1], cache_dir=tmp_path)
    by_tensor = C.classify(images, labels=LABELS, clip=shapes_models[1], cache_dir=tmp_path)
    assert [t[0][0] for t in by_folder.topk] == [t[0][0] for t in by_tensor.topk]


def test_cli_table_and_csv(shapes_models, render_scenes, write_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLIPGUIDE_CACHE", str(tmp_path / "cache"))
    images, _ = render_scenes(2, seed=5, colour="red", shape="circle")
    run_dir, _ = write_run(images, ["a", "b"])
    labels = tmp_path / "labels.txt"
    labels.write_text("# shapes without the red circle\n" + "\n".join(x for x in LABELS if x != "red circle") + "\n")
    assert main(["classify", str(run_dir), "--labels", str(labels), "--extra-labels", "red circle", "--top-k", "2"]) == 0
    table = capsys.readouterr().out
    assert "+red circle * red circle" in table and "labels.txt" in table
    assert main(["classify", str(run_dir), "--labels", str(labels), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 2 * 5 and {r["labels"] for r in rows} == {"labels.txt"}
    assert list((tmp_path / "cache" / "labels").glob("*.safetensors"))


@pytest.mark.parametrize("args, message", [
    (["nowhere.png"], "does not exist"),
    (["{img}", "--labels", "{empty}"], "is empty"),
    (["{img}", "--labels", "missing.txt"], "label file"),
    (["{img}", "--templates", "fancy"], "templates"),
    (["{img}", "--top-k", "0"], "--top-k"),
    (["{img}", "--labels", "{empty_ok}", "--extra-labels", "red circle"], "already among"),
])
def test_cli_errors_are_one_line_exit_2(args, message, tmp_path, capsys):
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "ok.txt").write_text("red circle\nblue square\n")
    paths = {"img": img, "empty": tmp_path / "empty.txt", "empty_ok": tmp_path / "ok.txt"}
    assert main(["classify", *[a.format(**paths) for a in args]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("clipguide: error:")


def test_load_labels_rejects_empty_sequences():
    with pytest.raises(ConfigError, match="empty"):
        C.load_labels(["", "  "])
