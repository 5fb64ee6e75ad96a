"""Every user-facing error of the loaders, the weight cache, the safe unpickler, the audits, the
output filter, lineage and replay is reached, and is one line naming the problem and the fix.

These cover the raises the module tests leave unexecuted, with the cheapest inputs that reach
them: tiny files in tmp_path, stub objects and monkeypatched downloads (no network, no models).
"""

from __future__ import annotations

import importlib
import io
import json
import zipfile
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from clipguide.audit import classification, output_filter
from clipguide.models import clip, safeload, weights
from clipguide.records import lineage
from clipguide.config import RunConfig
from clipguide.models.dalle import DalleDecoder
from clipguide.models import dalle_files, vqgan
from clipguide.models.decoders import load_decoder
from clipguide.errors import ConfigError, UnsafePickleError, WeightsError
from clipguide.records.manifest import MANIFEST

replay = importlib.import_module("clipguide.run.replay")  # the package exports a replay() function under that name


def one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert str(part) in msg, (part, msg)


def write(path, text):
    path.write_text(text)
    return path


# --- clip.py ----------------------------------------------------------------------------------


def test_clip_config_not_json(tmp_path):
    with pytest.raises(ConfigError) as e:
        clip.parse_clip_spec(str(write(tmp_path / "c.json", "{not json")))
    one_line(e, "is not valid JSON", "fix or regenerate it")


def test_clip_config_not_open_clip(tmp_path):
    with pytest.raises(ConfigError) as e:
        clip.parse_clip_spec(str(write(tmp_path / "c.json", json.dumps({"kind": "dall_e"}))))
    one_line(e, "is not an open_clip model config", "kind 'open_clip'", "embed_dim")


def test_clip_config_without_its_weights(tmp_path):
    info = {"kind": "open_clip", "model_cfg": {"embed_dim": 8}}
    with pytest.raises(WeightsError) as e:
        clip.parse_clip_spec(str(write(tmp_path / "c.json", json.dumps(info))))
    one_line(e, "c.safetensors is missing", "put it beside the .json")


def test_clip_spec_without_weights():
    with pytest.raises(ConfigError) as e:
        clip.parse_clip_spec("ViT-B-32")
    one_line(e, "names no weights", "ViT-B-32/TAG")


def test_clip_non_square_input():
    with pytest.raises(ConfigError) as e:
        clip._square((32, 16), "odd")
    one_line(e, "takes 32x16 images", "only square inputs")


def test_clip_download_that_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPGUIDE_CACHE", str(tmp_path))
    monkeypatch.setattr(clip, "_cached_pretrained", lambda *a: None)
    monkeypatch.setattr(weights, "is_reachable", lambda *a, **k: True)

    def broken(*a, **k):
        raise RuntimeError("HTTP 500\nserver error")

    monkeypatch.setattr(clip.open_clip, "download_pretrained", broken)
    with pytest.raises(WeightsError) as e:
        clip.pretrained_weights(clip.parse_clip_spec("ViT-B-32/openai"))
    one_line(e, "downloading CLIP weights ViT-B-32/openai", "HTTP 500 server error", "try again")


# --- decoders/__init__.py ---------------------------------------------------------------------


def test_init_image_without_an_encoder():
    stub = SimpleNamespace(encoder=None, encoder_source=None, name="plain")
    with pytest.raises(ConfigError) as e:
        DalleDecoder.check_encoder(stub)
    one_line(e, "without its dVAE encoder", "--init-image", "use a model .json with an encoder")


def test_init_image_with_a_missing_encoder_pkl(tmp_path):
    stub = SimpleNamespace(encoder=None, encoder_source=tmp_path / "encoder.pkl", name="decoder.pkl")
    with pytest.raises(WeightsError) as e:
        DalleDecoder.check_encoder(stub)
    one_line(e, "needs the dVAE encoder", "does not exist", "--decoder dalle")


def test_unknown_decoder():
    with pytest.raises(ConfigError) as e:
        load_decoder("no-such-decoder")
    one_line(e, "unknown decoder 'no-such-decoder'", "use one of")


def test_decoder_json_that_does_not_exist(tmp_path):
    with pytest.raises(WeightsError) as e:
        load_decoder(str(tmp_path / "absent.json"))
    one_line(e, "decoder config", "does not exist", "check the path")


def test_decoder_json_of_another_kind(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_decoder(str(write(tmp_path / "d.json", json.dumps({"kind": "open_clip"}))))
    one_line(e, "has kind 'open_clip'", "supported here: dall_e, taming")


# --- decoders/dalle_files.py ------------------------------------------------------------------


def test_dvae_json_of_another_kind(tmp_path):
    with pytest.raises(ConfigError) as e:
        dalle_files.load_dalle_safetensors(write(tmp_path / "d.json", json.dumps({"kind": "taming"})))
    one_line(e, "has kind 'taming', not 'dall_e'", "pass a dVAE model .json")


def test_dvae_json_without_its_weights(tmp_path):
    with pytest.raises(WeightsError) as e:
        dalle_files.load_dalle_safetensors(write(tmp_path / "d.json", json.dumps({"kind": "dall_e"})))
    one_line(e, "d.safetensors is missing", "put it beside the .json")


def test_dvae_json_that_does_not_exist(tmp_path):
    with pytest.raises(WeightsError) as e:
        dalle_files.load_dalle_safetensors(tmp_path / "absent.json")
    one_line(e, "model config", "does not exist", "check the path")


def test_dvae_json_not_json(tmp_path):
    with pytest.raises(ConfigError) as e:
        dalle_files.load_dalle_safetensors(write(tmp_path / "d.json", "{oops"))
    one_line(e, "is not valid JSON", "fix or regenerate it")


def test_dvae_json_with_invalid_settings(tmp_path):
    save_file({"encoder.x": torch.zeros(1)}, tmp_path / "d.safetensors")
    cfg = {"kind": "dall_e", "encoder": {"no_such_setting": 1}}
    with pytest.raises(ConfigError) as e:
        dalle_files.load_dalle_safetensors(write(tmp_path / "d.json", json.dumps(cfg)))
    one_line(e, "invalid dall_e Encoder settings", "no_such_setting")


def test_dvae_pkl_that_does_not_exist(tmp_path):
    with pytest.raises(WeightsError) as e:
        dalle_files.load_dalle_decoder(tmp_path / "decoder.pkl")
    one_line(e, "dVAE decoder file", "does not exist", "omit it to download decoder.pkl")


# --- decoders/vqgan.py ------------------------------------------------------------------------


def test_vqgan_yaml_that_does_not_exist(tmp_path):
    with pytest.raises(WeightsError) as e:
        vqgan.read_yaml_config(tmp_path / "absent.yaml")
    one_line(e, "VQGAN config", "does not exist", "check the path")


def test_vqgan_yaml_unreadable(tmp_path):
    with pytest.raises(ConfigError) as e:
        vqgan.read_yaml_config(write(tmp_path / "m.yaml", "model: [unclosed\n  target: {"))
    one_line(e, "is not a readable YAML config", "pass the taming model .yaml")


def test_vqgan_yaml_without_a_target(tmp_path):
    with pytest.raises(ConfigError) as e:
        vqgan.read_yaml_config(write(tmp_path / "m.yaml", "model:\n  params: {}\n"))
    one_line(e, "has no model target", "model: target:")


def test_vqgan_yaml_of_another_model(tmp_path):
    with pytest.raises(ConfigError) as e:
        vqgan.read_yaml_config(write(tmp_path / "m.yaml", "model:\n  target: ldm.models.LatentDiffusion\n"))
    one_line(e, "describes a LatentDiffusion", "pass a VQGAN config")


def test_vqgan_yaml_with_remap(tmp_path):
    text = "model:\n  target: taming.models.vqgan.VQModel\n  params:\n    remap: idx.npy\n"
    with pytest.raises(ConfigError) as e:
        vqgan.read_yaml_config(write(tmp_path / "m.yaml", text))
    one_line(e, "remaps codebook indices", "idx.npy", "does not support")


def test_vqgan_yaml_without_an_architecture(tmp_path):
    text = "model:\n  target: taming.models.vqgan.VQModel\n  params:\n    n_embed: 16\n"
    with pytest.raises(ConfigError) as e:
        vqgan.read_yaml_config(write(tmp_path / "m.yaml", text))
    one_line(e, "lacks a VQGAN architecture", "ddconfig, n_embed and embed_dim")


def test_vqgan_json_of_another_kind(tmp_path):
    with pytest.raises(ConfigError) as e:
        vqgan.read_json_config(write(tmp_path / "v.json", json.dumps({"kind": "dall_e"})))
    one_line(e, "has kind 'dall_e', not 'taming'", "pass a VQGAN model .json")


def test_vqgan_invalid_ddconfig():
    cfg = vqgan.TamingConfig("vq", {"no_such_setting": 1}, 16, 4, "", "m.yaml")
    with pytest.raises(ConfigError) as e:
        vqgan.build_parts(cfg, parts=("decoder",), device="meta")
    one_line(e, "m.yaml: invalid VQGAN ddconfig", "fix the config")


def test_vqgan_json_export_of_a_gumbel_model(tmp_path):
    stub = SimpleNamespace(config=SimpleNamespace(quantizer="gumbel"))
    with pytest.raises(ConfigError) as e:
        vqgan.write_json(stub, tmp_path / "g.json")
    one_line(e, "holds VectorQuantizer2 models", "keep the Gumbel .yaml/.ckpt")
    assert not (tmp_path / "g.json").exists()


# --- safeload.py ------------------------------------------------------------------------------


def test_safe_load_of_a_missing_file(tmp_path):
    with pytest.raises(WeightsError) as e:
        safeload.load_checkpoint_tensors(tmp_path / "absent.pt")
    one_line(e, "weights file", "does not exist", "check the path")


def test_checkpoint_without_tensors(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "c.pt")
    with pytest.raises(WeightsError) as e:
        safeload.load_checkpoint_tensors(tmp_path / "c.pt")
    one_line(e, "holds no state dict of tensors (found dict)", "pass a weights checkpoint")


def test_torchscript_archive_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "m.pt", "w") as z:
        z.writestr("m/constants.pkl", b"")
        z.writestr("m/data.pkl", b"")
    with pytest.raises(UnsafePickleError) as e:
        safeload.load_checkpoint_tensors(tmp_path / "m.pt")
    one_line(e, "is a TorchScript archive", "use a state-dict checkpoint or .safetensors file")


# --- weights.py -------------------------------------------------------------------------------


class _Response(io.BytesIO):
    def __init__(self, body: bytes, length: int):
        super().__init__(body)
        self.headers = {"Content-Length": str(length)}


def test_download_cut_short(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPGUIDE_CACHE", str(tmp_path))
    monkeypatch.setattr(weights.urllib.request, "urlopen", lambda *a, **k: _Response(b"abcd", 10))
    with pytest.raises(WeightsError) as e:
        weights.fetch("https://example.invalid/w.bin", subdir="t")
    one_line(e, "was cut short (4 of 10 bytes)", "try again")
    assert not list((tmp_path / "t").iterdir())  # no half file, no temp file


def test_download_into_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(weights.urllib.request, "urlopen", lambda *a, **k: _Response(b"abcd", 4))

    class Full:
        def write(self, chunk):
            raise OSError(28, "No space left on device")

    with pytest.raises(WeightsError) as e:
        weights._stream("https://example.invalid/w.bin", Full(), tmp_path / "w.bin")
    one_line(e, "cannot write", "No space left on device", "point CLIPGUIDE_CACHE elsewhere")


# --- classification.py ------------------------------------------------------------------------


def test_audit_of_nothing():
    with pytest.raises(ConfigError) as e:
        classification.gather_images([])
    one_line(e, "no images to audit", "give image files")


def test_audit_of_an_empty_batch():
    """An empty [0, 3, H, W] tensor once reached torch.cat's "expected a non-empty list" instead."""
    with pytest.raises(ConfigError) as e:
        classification.gather_images(torch.zeros(0, 3, 8, 8))
    one_line(e, "no images to audit")


def test_audit_of_an_empty_folder(tmp_path):
    write(tmp_path / "notes.txt", "no images here")
    with pytest.raises(ConfigError) as e:
        classification.gather_images(tmp_path)
    one_line(e, "holds no images", "check the path")


def test_audit_of_a_run_without_snapshots(tmp_path):
    with pytest.raises(ConfigError) as e:
        classification._run_items(tmp_path, {"runs": [], "snapshots": []}, None)
    one_line(e, "has no saved snapshot to audit", "wait for the run")


def test_template_file_without_a_slot(tmp_path):
    path = write(tmp_path / "t.txt", "a photo of {}\na plain photo\n")
    with pytest.raises(ConfigError) as e:
        classification.load_templates(str(path), SimpleNamespace(name="tiny"))
    one_line(e, "every line needs '{}'", "a plain photo")


# --- output_filter.py -------------------------------------------------------------------------


def test_concept_file_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError) as e:
        output_filter.parse_concepts(str(tmp_path / "absent.json"))
    one_line(e, "concept file", "does not exist", "check the path")


def test_concept_file_of_another_shape(tmp_path):
    path = write(tmp_path / "c.json", json.dumps({"items": []}))
    with pytest.raises(ConfigError) as e:
        output_filter.parse_concepts(str(path))
    one_line(e, "is not a concept list (KeyError", '{"concepts": [{"text": ..., "threshold": ...}]')


def test_concept_file_with_no_concepts(tmp_path):
    path = write(tmp_path / "c.json", json.dumps({"concepts": []}))
    with pytest.raises(ConfigError) as e:
        output_filter.parse_concepts(str(path))
    one_line(e, "lists no concepts", "add at least one")


def test_unknown_filter_action():
    with pytest.raises(ConfigError) as e:
        output_filter.OutputFilter(None, {"red": 0.3}, action="shred")
    one_line(e, "--filter-action 'shred' is not one of", "blur")


def test_calibration_concept_outside_the_shapes_world():
    with pytest.raises(ConfigError) as e:
        output_filter.shapes_sets("zzz", n=2)
    one_line(e, "names no shapes-world colour or shape", "--positives and --negatives")


# --- lineage.py -------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A folder with a manifest, whose (checked) reading is stubbed: ``set(manifest)``."""
    write(tmp_path / MANIFEST, "{}")
    state = {}
    monkeypatch.setattr(lineage, "read_manifest", lambda d: state["manifest"])
    return tmp_path, state.__setitem__


def test_lineage_of_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(ConfigError) as e:
        lineage.final_image(tmp_path)
    one_line(e, "is not a clipguide run directory", "give the --out of an earlier run")


def test_lineage_of_a_run_directory_with_several_runs(run_dir):
    path, put = run_dir
    put("manifest", {"runs": [{}, {}], "snapshots": []})
    with pytest.raises(ConfigError) as e:
        lineage.final_image(path)
    one_line(e, "holds 2 runs", "pick one", "run_00")


def test_lineage_of_a_run_that_is_not_there(run_dir):
    path, put = run_dir
    put("manifest", {"runs": [{}], "snapshots": []})
    with pytest.raises(ConfigError) as e:
        lineage.final_image(path, run=3)
    one_line(e, "has no run 3", "runs 0..0")


def test_lineage_of_a_run_without_snapshots(run_dir):
    path, put = run_dir
    put("manifest", {"runs": [{}], "snapshots": []})
    with pytest.raises(ConfigError) as e:
        lineage.final_image(path)
    one_line(e, "saved no snapshot yet", "start from another run")


# --- replay.py --------------------------------------------------------------------------------


def test_replay_of_a_run_interrupted_before_its_first_step():
    recorded = RunConfig(prompts=("red",), device="cpu")
    with pytest.raises(ConfigError) as e:
        replay.replay_config({"interrupted": True, "steps_done": 0}, recorded, None)
    one_line(e, "interrupted before its first step", "nothing to replay")


# --- config.py and devices.py -----------------------------------------------------------------


@pytest.mark.parametrize("fields,words", [
    ({"batch": 0}, "--batch must be at least 1"),
    ({"seed": -1}, "--seed must be 0 or more"),
    ({"seed": 2**63 - 1, "batch": 2}, "at most 2**63 - 1"),
    ({"cutn": 0}, "--cutn must be at least 1"),
    ({"size": 4}, "--size must be at least 8 pixels"),
    ({"init": "onehot-codes"}, "needs --init-codes, e.g."),
    ({"cut": "normal", "cut_range": (0.5, 0.1)}, "--cut normal needs --cut-range with 4 numbers, got 2"),
    ({"init_weight": -0.5}, "--init-weight must be 0 or positive"),
    ({"augments": ("Af", "Xx")}, "--augments 'Xx' is not one of Ji, Sh, Gn, Pe, Ro, Af, Et, Ts, Cr, Er, Re"),
    ({"cut": "pooled", "cut_whole": 0.25}, "--cut pooled views the whole image in every cutout"),
    ({"init_weight": float("nan")}, "--init-weight must be 0 or positive"),
])
def test_config_refuses_on_one_line(fields, words):
    from clipguide import RunConfig

    with pytest.raises(ConfigError) as e:
        RunConfig(prompts=("x",), **fields)
    one_line(e, words)


def test_devices_refuse_what_is_not_here(monkeypatch):
    from clipguide.engine.devices import check_device

    with pytest.raises(ConfigError) as e:
        check_device("gpu0")
    one_line(e, "'gpu0' is not a torch device", "use auto, cpu, cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError) as e:
        check_device("cuda:3")
    one_line(e, "--device cuda:3: only 1 CUDA device(s) present")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        check_device("mps")
    one_line(e, "asked for Apple's MPS, which is not available here")


# --- cli.py -------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,words", [
    (["calibrate-filter", "--concept", "red", "--positives", "a.png"], "give both --positives and --negatives, or neither"),
    (["generate", "x", "--pyramid", "2,four"], "expected comma-separated ints, got '2,four'"),
    (["generate", "x", "--checkpoint-every", "-1"], "expected a whole number >= 0, got '-1'"),
    (["generate", "x", "--augments", "Af,Pe,Zz"], "--augments 'Zz' is not one of"),
])
def test_cli_refuses_on_one_line_with_exit_2(argv, words, capsys):
    from clipguide.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err, err
