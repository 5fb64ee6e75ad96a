"""Checkpoints and resuming, in process on tiny random-weight models: bit-identical continuation
from any step, the checkpoint file and its checks, the non-finite guard, resume's refusals."""

import json
import os
import random
import shutil
import signal
import warnings

import pytest
import torch

import clipguide
from clipguide.models import loading
from clipguide import CheckpointError, ConfigError, NonFiniteError, WeightsError, get_preset, optimise
from clipguide.records.checkpoints import FILENAME, read_checkpoint, write_checkpoint
from clipguide.run.checkpoints import Checkpointer
from clipguide.cli import main
from clipguide.engine.loop import deferred_interrupt
from clipguide.records.manifest import read_manifest

SMALL = dict(size=32, cutn=3, decoder="t", clip="t")


def cfg_of(preset="shapes", **kw):
    return get_preset(preset).replace(**{**SMALL, "prompts": ("a red circle",), "steps": 6, **kw})


def checkpoints_of(cfg, decoder, clip, tmp_path):
    """An uninterrupted run, and every step's checkpoint read back from a file."""
    saved = {}

    def keep(state):
        path = tmp_path / f"step{state.step}.safetensors"
        write_checkpoint(path, state.checkpoint())
        saved[state.step] = read_checkpoint(path)

    return optimise(cfg, decoder, clip, keep), saved


def assert_same_run(a, b, since: int = 0):
    assert torch.equal(a.images, b.images) and torch.equal(a.latent, b.latent)
    assert torch.equal(a.losses, b.losses) and torch.equal(a.similarities, b.similarities)
    assert a.steps_done == b.steps_done
    for step, images in b.snapshots.items():
        assert step >= since and torch.equal(a.snapshots[step], images), step


# Every latent parametrisation, both optimisers, EMA, temperature annealing, lr growth, the init
# anchor, pixel noise with display noise, and a batch of two prompts x two seeds.
PRESETS = {
    "shapes": dict(init_weight=0.5),  # categorical, EMA, AdamW, affine cutouts
    "aleph2image-gamma": dict(prompts=("a red circle", "blue:-0.5 | a square")),  # parity-gumbel, annealing, batch 2, Adam
    "dvae-codebook": dict(noise_scale=1.0),  # Laplace noise in training and display
    "aleph2image": {},  # spatial Gumbel, normal cut law
    "aleph2image-delta": {},  # parity softmax, lr growth, cutout noise
    "shapes/bf16": dict(precision="bf16"),  # decoder and CLIP in bfloat16
    "shapes/pyramid": dict(pyramid=(2, 4), pyramid_every=2, cut_batch=2),  # coarse to fine; CLIP backward in chunks
}


@pytest.mark.parametrize("preset", PRESETS)
def test_resume_from_any_step_is_bit_identical(tiny_dvae, tiny_clip, tmp_path, preset):
    cfg = cfg_of(preset.split("/")[0], snapshots=(0, 2, 5), **PRESETS[preset])
    full, saved = checkpoints_of(cfg, tiny_dvae, tiny_clip, tmp_path)
    assert set(saved) == set(range(cfg.steps + 1))
    for step in (0, 3, cfg.steps) if preset != "shapes" else saved:
        resumed = optimise(cfg, tiny_dvae, tiny_clip, resume_from=saved[step])
        assert_same_run(full, resumed, since=step)
        assert set(resumed.snapshots) == {s for s in cfg.snapshots if s >= step}


def test_zquantize_resumes_bit_identically(tiny_clip, tmp_path):
    from clipguide.testing import random_vqgan

    vqgan = random_vqgan({"ddconfig": {"double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3, "out_ch": 3,
                                       "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                                       "dropout": 0.0}, "n_embed": 64, "embed_dim": 8})
    cfg = cfg_of("vqgan-zquantize", init_weight=1.0)
    full, saved = checkpoints_of(cfg, vqgan, tiny_clip, tmp_path)
    assert_same_run(full, optimise(cfg, vqgan, tiny_clip, resume_from=saved[4]), since=4)


def test_extending_a_finished_run_equals_a_longer_run(tiny_dvae, tiny_clip, tmp_path):
    short, saved = checkpoints_of(cfg_of(steps=4), tiny_dvae, tiny_clip, tmp_path)
    assert short.checkpoint.step == 4
    extended = optimise(cfg_of(steps=7), tiny_dvae, tiny_clip, resume_from=short.checkpoint)
    assert_same_run(optimise(cfg_of(steps=7), tiny_dvae, tiny_clip), extended)


def test_checkpoint_refuses_another_config_or_a_step_beyond_the_run(tiny_dvae, tiny_clip, tmp_path):
    _, saved = checkpoints_of(cfg_of(steps=3), tiny_dvae, tiny_clip, tmp_path)
    with pytest.raises(ConfigError, match="lr differ"):
        optimise(cfg_of(steps=3, lr=0.3), tiny_dvae, tiny_clip, resume_from=saved[2])
    with pytest.raises(ConfigError, match="--steps 3 or more"):
        optimise(cfg_of(steps=2), tiny_dvae, tiny_clip, resume_from=saved[3])


def test_ctrl_c_result_carries_a_resumable_checkpoint(tiny_dvae, tiny_clip):
    cfg = cfg_of(snapshots=(5,))

    def stop(state):
        if state.step == 3:
            raise KeyboardInterrupt

    partial = optimise(cfg, tiny_dvae, tiny_clip, stop)
    assert partial.interrupted and partial.steps_done == 3 and partial.checkpoint.step == 3
    assert_same_run(optimise(cfg, tiny_dvae, tiny_clip), optimise(cfg, tiny_dvae, tiny_clip, resume_from=partial.checkpoint))


def test_ctrl_c_inside_an_update_is_delivered_after_it():
    handler, done = signal.getsignal(signal.SIGINT), []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the rest of the update ran")
    assert done and signal.getsignal(signal.SIGINT) is handler


# ----------------------------------------------------------------------------- non-finite guard


class NaNAfter:
    """A decoder whose output turns NaN from its ``n``-th training decode on."""

    def __init__(self, decoder, n):
        self.decoder, self.n, self.calls = decoder, n, 0

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def cast(self, dtype):  # the loop decodes through the decoder's cast for --precision
        self.decoder = self.decoder.cast(dtype)
        return self

    def decode(self, codes, noise=None):
        x = self.decoder.decode(codes, noise)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.n:
                x = x * float("nan")
        return x


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_dvae, tiny_clip, tmp_path):
    keeper = Checkpointer(tmp_path, every=1)
    seen = []
    with pytest.raises(NonFiniteError) as err:
        optimise(cfg_of(), NaNAfter(tiny_dvae, 3), tiny_clip, [lambda s: seen.append(s.step), keeper])
    assert err.value.step == 3 and err.value.runs == [0] and seen == [0, 1, 2]
    assert "loss" in str(err.value) and "step 3" in str(err.value) and "\n" not in str(err.value)
    kept = read_checkpoint(tmp_path / FILENAME)
    assert kept.step == 2 and all(torch.isfinite(v).all() for v in kept.latent.values())


def test_infinite_lr_names_the_latent_and_the_cli_says_so_on_one_line(tiny_model_files, tmp_path, capsys):
    dec, clip = tiny_model_files
    with pytest.raises(NonFiniteError, match=r"latent of run\(s\) 0 .* step 1"):
        optimise(cfg_of(lr=float("inf")), clipguide.load_decoder(str(dec)), clipguide.load_clip(str(clip)))
    out = tmp_path / "run"
    rc = main(["generate", "x", "--preset", "shapes", "--decoder", str(dec), "--clip", str(clip), "--size", "32", "--cutn", "2",
               "--lr", "inf", "--steps", "5", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("clipguide: error:") and "step 1" in err and "step 0, stays in" in err, err
    assert read_checkpoint(out / FILENAME).step == 0


def test_a_checkpoint_with_nan_is_never_written(tiny_dvae, tiny_clip, tmp_path):
    full, saved = checkpoints_of(cfg_of(steps=2), tiny_dvae, tiny_clip, tmp_path)
    path = tmp_path / FILENAME
    write_checkpoint(path, saved[1])
    before = path.read_bytes()
    bad = saved[2]
    bad.latent["param"] = bad.latent["param"].clone().fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="previous checkpoint is kept"):
        write_checkpoint(path, bad)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------- the file and its checks


@pytest.fixture
def written(tiny_dvae, tiny_clip, tmp_path):
    _, saved = checkpoints_of(cfg_of(steps=3, ema=0.9), tiny_dvae, tiny_clip, tmp_path)
    path = tmp_path / FILENAME
    write_checkpoint(path, saved[2], {"models": {"decoder": {"name": "t"}}})
    return path


def test_checkpoint_file_is_safetensors_with_a_checked_record(written):
    from safetensors import safe_open

    with safe_open(str(written), "pt") as f:
        names, meta = set(f.keys()), f.metadata()
    assert {"latent.param", "latent.param_ema", "latent._extra_state", "optimiser.0.exp_avg", "optimiser.0.exp_avg_sq",
            "optimiser.0.step", "generator.0", "losses", "similarities"} == names
    record = json.loads(meta["clipguide"])
    assert (record["format"], record["version"], record["step"]) == ("clipguide-checkpoint", 1, 2)
    assert record["models"] == {"decoder": {"name": "t"}} and record["param_groups"][0]["lr"] == 0.1
    ck = read_checkpoint(written)
    assert ck.step == 2 and ck.losses.shape == (2, 1) and ck.info["models"] == {"decoder": {"name": "t"}}


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1:]


def foreign(_: bytes) -> bytes:
    from safetensors.torch import save

    return save({"x": torch.zeros(2)})


CORRUPTIONS = {
    "a flipped tensor byte": (lambda d: flip(d, len(d) - 100), "fails its sha256"),
    "a changed step in the header": (lambda d: flip(d, d.index(b'step\\": ') + 8), "header fails its sha256"),
    "truncated": (lambda d: d[: len(d) // 2], "corrupt"),
    "empty": (lambda d: b"", "not a safetensors file"),
    "garbage": (lambda d: random.Random(0).randbytes(4096), "corrupt"),  # seeded: the same bytes every run
    "a foreign safetensors file": (foreign, "not a clipguide"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupted_checkpoint_is_named_and_not_used(written, kind):
    corrupt, needle = CORRUPTIONS[kind]
    written.write_bytes(corrupt(written.read_bytes()))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(written)
    message = str(err.value)
    assert str(written) in message and needle in message and "\n" not in message, message


def test_newer_format_version_is_refused_by_name(written):
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load, save

    with safe_open(str(written), "pt") as f:
        record = json.loads(f.metadata()["clipguide"])
    text = json.dumps({**record, "version": 2})
    meta = {"clipguide": text, "clipguide_sha256": hashlib.sha256(text.encode()).hexdigest()}
    written.write_bytes(save(load(written.read_bytes()), metadata=meta))
    with pytest.raises(CheckpointError, match="format version 2"):
        read_checkpoint(written)


def rewrite(path, record=lambda r: r, tensors=lambda t: t):
    """Rewrite a checkpoint through ``record`` (its header, with a valid sha256) and ``tensors``."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load, save

    with safe_open(str(path), "pt") as f:
        text = record(json.loads(f.metadata()["clipguide"]))
    text = text if isinstance(text, str) else json.dumps(text)
    meta = {"clipguide": text, "clipguide_sha256": hashlib.sha256(text.encode()).hexdigest()}
    path.write_bytes(save(tensors(load(path.read_bytes())), metadata=meta))


def without(record, key):
    return {k: v for k, v in record.items() if k != key}


# A header whose sha256 is right but whose record does not describe this file (written at step 2 of 3, one run).
WRONG_RECORDS = {
    "a step beyond the run": (lambda r: {**r, "step": 99}, {}, "malformed record: step 99 is outside 0..3"),
    "a loss history of another step": (lambda r: {**r, "step": 1}, {},
                                       "malformed record: a loss history of shape (2, 1) for 1 steps of 1 run(s)"),
    "an invalid config": (lambda r: {**r, "config": {**r["config"], "lr": -1}}, {},
                          "malformed record: config: --lr must be positive, got -1"),
    "param_groups not a list": (lambda r: {**r, "param_groups": {}}, {}, "malformed record: param_groups is not a list"),
    "no optimiser scalars": (lambda r: without(r, "optimiser_scalars"), {}, "malformed record: 'optimiser_scalars'"),
    "not JSON": (lambda r: "{'format': 'clipguide-checkpoint'", {}, "its header is not a clipguide checkpoint's"),
    "a JSON list": (lambda r: "[1, 2]", {}, "its header is not a clipguide checkpoint's"),
    "another format": (lambda r: {**r, "format": "other"}, {}, "its header is not a clipguide checkpoint's"),
    "a tensor missing": (lambda r: r, {"drop": "losses"}, "its tensors are not those its header lists"),
}


@pytest.mark.parametrize("kind", WRONG_RECORDS)
def test_a_checkpoint_whose_record_does_not_describe_it_is_corrupt(written, kind):
    record, options, needle = WRONG_RECORDS[kind]
    rewrite(written, record, lambda t: {k: v for k, v in t.items() if k != options.get("drop")})
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(written)
    assert str(err.value) == (f"checkpoint {written} is corrupt ({needle}); it was not used: restore it from a backup, "
                              "or start the run again with generate --overwrite"), str(err.value)


def test_an_unreadable_checkpoint_names_its_permissions(written, monkeypatch):
    import errno
    from pathlib import Path

    def denied(self):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # (chmod 000 would not stop root)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(written)
    assert str(err.value) == f"cannot read checkpoint {written} ({os.strerror(errno.EACCES)}): check its permissions"


def test_a_checkpoint_missing_losses_is_not_resumed(tiny_dvae, tiny_clip):
    import dataclasses

    cfg = cfg_of(steps=3)
    ck = optimise(cfg, tiny_dvae, tiny_clip).checkpoint
    bad = dataclasses.replace(ck, losses=ck.losses[:-1])  # only in memory: a file's history is checked on reading
    with pytest.raises(CheckpointError) as err:
        optimise(cfg, tiny_dvae, tiny_clip, resume_from=bad)
    assert str(err.value) == "the checkpoint at step 3 holds a loss history of 2 steps: it was not used"


@pytest.mark.parametrize("every", [-1, 2.5, "5", None])
def test_checkpoint_every_must_be_a_count(tmp_path, every):
    (tmp_path / FILENAME).write_bytes(b"an older run's")
    with pytest.raises(ConfigError) as err:
        Checkpointer(tmp_path, every)
    assert str(err.value) == f"--checkpoint-every must be 0 (only at snapshots) or a number of steps, got {every}"
    assert (tmp_path / FILENAME).read_bytes() == b"an older run's"  # refused before anything is removed


# ----------------------------------------------------------------------------- resume of run directories


@pytest.fixture
def model_flags(tiny_model_files):
    dec, clip = tiny_model_files
    return dict(preset="shapes", decoder=str(dec), clip=str(clip), size=32, cutn=2)


class Crash(Exception):
    """A stand-in for a crash: nothing after it runs (no finish, no final checkpoint)."""


def crash_at(step, error=Crash):
    """A callback raising ``error`` at ``step`` (Crash: a crash; KeyboardInterrupt: Ctrl-C)."""
    def cb(state):
        if state.step == step:
            raise error

    return cb


def test_api_resume_after_a_crash_equals_an_uninterrupted_run(model_flags, tmp_path):
    kw = dict(steps=9, snapshots=(2, 5, 8), seed=3, **model_flags)
    reference = clipguide.generate("a red circle", out_dir=tmp_path / "ref", **kw)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        clipguide.generate("a red circle", out_dir=run, callback=crash_at(7), checkpoint_every=3, **kw)
    assert read_checkpoint(run / FILENAME).step == 6  # steps 6 and 7 are recomputed
    (run / ".step_000009.png.abcd1234.tmp").write_bytes(b"half a PNG")  # left by a killed write
    resumed = clipguide.resume(run)
    assert torch.equal(resumed.images, reference.images) and torch.equal(resumed.losses, reference.losses)
    assert set(resumed.snapshots) == {8}  # only those taken after resuming
    ref, got = read_manifest(tmp_path / "ref"), read_manifest(run)
    strip = lambda m: [(s["run"], s["step"], s["file"], s["loss"], s["clip_similarity"]) for s in m["snapshots"]]  # noqa: E731
    assert strip(got) == strip(ref) and got["steps_done"] == 9 and not got["interrupted"]
    assert got["resumed"][0]["step"] == 6 and got["environment"] == ref["environment"]
    assert not list(run.glob(".*.tmp")), "stale temporary file left"
    from PIL import Image

    assert Image.open(run / "contact_sheet.png").size == Image.open(tmp_path / "ref" / "contact_sheet.png").size


def test_resume_extends_with_steps_and_refuses_fewer_steps_than_done(model_flags, tmp_path):
    run = tmp_path / "run"
    clipguide.generate("a blue square", out_dir=run, steps=4, **model_flags)
    with pytest.raises(ConfigError, match="before the checkpoint's step 4"):
        clipguide.resume(run, steps=3)
    longer = clipguide.resume(run, steps=6)
    assert torch.equal(longer.images, clipguide.generate("a blue square", steps=6, **model_flags).images)
    assert read_checkpoint(run / FILENAME).step == 6 and read_manifest(run)["config"]["steps"] == 6


def test_resume_refuses_changed_models_inputs_and_mismatched_files(model_flags, tmp_path, tiny_model_files):
    from PIL import Image

    image = tmp_path / "prompt.png"
    Image.new("RGB", (32, 32), "red").save(image)
    run = tmp_path / "run"
    clipguide.generate(f"a circle | image:{image}:0.5", out_dir=run, steps=3, **model_flags)
    Image.new("RGB", (32, 32), "blue").save(image)
    with pytest.raises(ConfigError, match="changed since the run started"):
        clipguide.resume(run)
    Image.new("RGB", (32, 32), "red").save(image)
    checkpoint = (run / FILENAME).read_bytes()
    other = tmp_path / "other"
    clipguide.generate("a square", out_dir=other, steps=3, **model_flags)
    (run / FILENAME).write_bytes((other / FILENAME).read_bytes())
    with pytest.raises(CheckpointError, match="describe different runs"):
        clipguide.resume(run)
    (run / FILENAME).write_bytes(checkpoint)
    weights = tiny_model_files[0].with_suffix(".safetensors")
    saved = weights.read_bytes()
    try:
        from safetensors.torch import load, save

        tensors = load(saved)
        name = next(iter(tensors))
        tensors[name] = tensors[name] + 1
        weights.write_bytes(save(tensors))
        loading.cached_decoder.cache_clear()
        with pytest.raises(WeightsError, match="models differ"):
            clipguide.resume(run)
    finally:
        weights.write_bytes(saved)
        loading.cached_decoder.cache_clear()


def test_cli_resume_errors_are_one_line(capsys, model_flags, tmp_path):
    run = tmp_path / "run"
    clipguide.generate("a red circle", out_dir=run, steps=2, **model_flags)
    manifest = (run / "manifest.json").read_text()

    def one_line(argv, *needles):
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and all(n in err for n in needles), err

    one_line(["resume", str(tmp_path / "nope")], "nope")
    one_line(["resume", str(run), "--steps", "0"], "--steps")
    one_line(["resume", str(run), "--checkpoint-every", "-1"], "--checkpoint-every")
    (run / "manifest.json").write_text(manifest[: len(manifest) // 2])
    one_line(["resume", str(run)], str(run / "manifest.json"), "not valid JSON")
    m = json.loads(manifest)
    m["snapshots"][0]["file"] = "../../outside.png"
    (run / "manifest.json").write_text(json.dumps(m))
    one_line(["resume", str(run)], str(run / "manifest.json"), "outside the run directory")
    (run / "manifest.json").write_text(manifest)
    (run / FILENAME).write_bytes(flip((run / FILENAME).read_bytes(), 5000))
    one_line(["resume", str(run)], str(run / FILENAME), "corrupt")
    (run / FILENAME).unlink()
    one_line(["resume", str(run)], str(run / FILENAME), "no checkpoint")


def test_resume_of_a_directory_without_a_run_names_the_manifest(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as err:
        clipguide.resume(empty)
    manifest = empty / "manifest.json"
    assert str(err.value) == f"cannot read {manifest} (No such file or directory): is {empty} a clipguide run directory?"


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_resume_names_a_snapshot_that_went_missing(model_flags, tmp_path, damage):
    run = tmp_path / "run"
    with pytest.raises(Crash):
        clipguide.generate("a red circle", out_dir=run, steps=6, snapshots=(2,), callback=crash_at(4), **model_flags)
    png = run / "step_000002.png"
    png.unlink() if damage == "deleted" else png.write_bytes(png.read_bytes()[:40])
    checkpoint = (run / FILENAME).read_bytes()
    with pytest.raises(ConfigError) as err:
        clipguide.resume(run)
    kind = "FileNotFoundError" if damage == "deleted" else "UnidentifiedImageError"
    assert str(err.value) == (f"snapshot {png} listed in manifest.json is missing or unreadable ({kind}): "
                              "restore it, or start the run again"), str(err.value)
    assert (run / FILENAME).read_bytes() == checkpoint and not (run / "step_000006.png").exists()


def test_snapshotter_refuses_models_that_are_not_the_loops(tiny_dvae, tiny_clip, tmp_path):
    from clipguide import Snapshotter

    cfg = cfg_of(steps=2)
    saver = Snapshotter(tmp_path / "run", cfg, {"decoder": {"name": "another"}})
    with pytest.raises(ConfigError) as err:
        optimise(cfg, tiny_dvae, tiny_clip, saver)
    assert str(err.value) == ("the models given to Snapshotter ({'decoder': {'name': 'another'}}) are not those the loop "
                              "runs with: leave models out, the loop describes its own")
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_resume_refuses_a_filter_it_cannot_rebuild_or_another_filter_clip(model_flags, tmp_path):
    run = tmp_path / "run"
    screen = clipguide.OutputFilter(model_flags["clip"], {"a red circle": 0.99}, action="blur")
    clipguide.generate("a red circle", out_dir=run, steps=2, output_filter=screen, **model_flags)
    saved = json.loads((run / "manifest.json").read_text())
    record = saved["filter"]
    manifest = {**saved, "filter": without(record, "concepts")}
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError) as err:
        clipguide.resume(run, steps=3)
    assert str(err.value) == (f"the output filter recorded in {run / 'manifest.json'} cannot be rebuilt ('concepts'): "
                              "refusing to resume without it")
    manifest = {**saved, "filter": {**record, "clip": {**record["clip"], "sha256": "0" * 64}}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError) as err:
        clipguide.resume(run, steps=3)
    assert str(err.value) == (f"the output filter's CLIP {record['clip']['name']} differs from the one {run} was screened "
                              "with (sha256): restore its weights to resume")
    assert read_checkpoint(run / FILENAME).step == 2


def test_resume_screens_with_the_runs_output_filter(model_flags, tmp_path):
    from PIL import Image

    def screen():  # a threshold of -1 flags every snapshot: each is withheld
        return clipguide.OutputFilter(model_flags["clip"], {"a red circle": -1.0}, action="withhold")

    kw = dict(steps=6, snapshots=(2, 4), **model_flags)
    clipguide.generate("a red circle", out_dir=tmp_path / "ref", output_filter=screen(), **kw)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        clipguide.generate("a red circle", out_dir=run, output_filter=screen(), callback=crash_at(5), checkpoint_every=2, **kw)
    clipguide.resume(run)
    ref, got = read_manifest(tmp_path / "ref"), read_manifest(run)
    assert got["filter"] == ref["filter"]
    assert [s.get("filter") for s in got["snapshots"]] == [s.get("filter") for s in ref["snapshots"]]
    assert got["snapshots"][-1]["filter"]["flagged"]
    final = "step_000006.png"
    assert Image.open(run / final).tobytes() == Image.open(tmp_path / "ref" / final).tobytes()


# ----------------------------------------------------------------------------- Ctrl-C off the schedule, other environments


def stop_at(step):
    return crash_at(step, KeyboardInterrupt)


def test_ctrl_c_off_the_schedule_checkpoints_the_step_it_stopped_at(model_flags, tmp_path):
    """Step 3 is on no schedule (every 1000 steps, no snapshots): only Checkpointer.finish writes it."""
    kw = dict(steps=8, snapshots=(), seed=2, **model_flags)
    run = tmp_path / "run"
    partial = clipguide.generate("a red circle", out_dir=run, callback=stop_at(3), checkpoint_every=1000, **kw)
    assert partial.interrupted and partial.steps_done == 3
    kept = read_checkpoint(run / FILENAME)
    assert kept.step == 3, f"Ctrl-C at step 3 left the checkpoint of step {kept.step}"
    assert torch.equal(kept.losses, partial.losses[:3]) and read_manifest(run)["interrupted"]
    resumed = clipguide.resume(run)
    assert_same_run(clipguide.generate("a red circle", **kw), resumed)
    assert read_checkpoint(run / FILENAME).step == 8 and read_manifest(run)["resumed"][0]["step"] == 3


def test_checkpointer_finish_writes_the_interrupted_step_once(tiny_dvae, tiny_clip, tmp_path):
    cfg = cfg_of(steps=50, snapshots=())
    keeper = Checkpointer(tmp_path, every=1000)
    result = optimise(cfg, tiny_dvae, tiny_clip, [keeper, stop_at(3)])
    assert read_checkpoint(tmp_path / FILENAME).step == 0  # the schedule's last write
    keeper.finish(result)
    kept = read_checkpoint(tmp_path / FILENAME)
    assert kept.step == 3 and kept.info["every"] == 1000 and kept.info["models"] == json.loads(json.dumps(result.models))
    before = (tmp_path / FILENAME).stat().st_mtime_ns
    keeper.finish(result)  # on disk already: not written again
    assert (tmp_path / FILENAME).stat().st_mtime_ns == before
    assert_same_run(optimise(cfg, tiny_dvae, tiny_clip), optimise(cfg, tiny_dvae, tiny_clip, resume_from=kept), since=3)


def elsewhere(monkeypatch, **changes):
    """Make the resuming process report another environment than the one the run recorded."""
    from clipguide.records import manifest
    from clipguide.run import checkpoints, resume

    for module in (resume, checkpoints):  # what the resume compares and what its checkpoints record
        monkeypatch.setattr(module, "environment", lambda: {**manifest.environment(), **changes})


def test_resuming_in_another_environment_warns_naming_what_differs(model_flags, tmp_path, monkeypatch):
    run = tmp_path / "run"
    clipguide.generate("a red circle", out_dir=run, steps=2, **model_flags)
    recorded = read_checkpoint(run / FILENAME).info["environment"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same environment: no warning
        clipguide.resume(run, steps=3)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    elsewhere(monkeypatch, torch="0.0.1", clipguide="0.0.0", cpu="OtherVendor")
    with pytest.warns(UserWarning) as caught:
        clipguide.resume(run, steps=4)
    (message,) = [str(w.message) for w in caught]
    assert message == (f"resuming {run} in another environment (torch {recorded['torch']} -> 0.0.1; clipguide "
                       f"{recorded['clipguide']} -> 0.0.0; cpu {recorded['cpu']} -> OtherVendor): the continuation "
                       "will not be bit-identical to an uninterrupted run"), message
    monkeypatch.undo()
    threads = torch.get_num_threads()  # 1 for the whole suite (conftest)
    try:
        torch.set_num_threads(threads + 1)
        with pytest.warns(UserWarning, match=rf"another environment \(threads {threads} -> {threads + 1}\)"):
            clipguide.resume(copy, steps=4)
    finally:
        torch.set_num_threads(threads)


def test_cli_resume_says_on_one_line_what_is_not_bit_identical(model_flags, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    clipguide.generate("a red circle", out_dir=run, steps=2, **model_flags)
    recorded = read_checkpoint(run / FILENAME).info["environment"]
    assert main(["resume", str(run), "--steps", "3", "--quiet"]) == 0
    assert "not bit-identical" not in capsys.readouterr().err  # the same environment
    elsewhere(monkeypatch, torch="0.0.1")
    assert main(["resume", str(run), "--steps", "4", "--quiet"]) == 0
    line, = [x for x in capsys.readouterr().err.splitlines() if x.startswith("clipguide: resuming")]
    assert line == (f"clipguide: resuming {run} at step 3 of 4 on {torch.get_num_threads()} thread(s) "
                    f"(not bit-identical: torch {recorded['torch']} -> 0.0.1)"), line


# ----------------------------------------------------------------------------- a checkpoint that does not fit


def misfit(ck, part):
    """``ck`` with one part that does not fit the run (still a well-formed file once written)."""
    if part == "latent":  # a latent of another shape
        ck.latent["param"] = ck.latent["param"][:, :-1].clone()
    elif part == "generator":  # a generator state of the wrong size
        ck.generators[0] = ck.generators[0][:100].clone()
    else:  # an optimiser of two parameters for the run's one
        ck.optimiser["param_groups"][0]["params"] = [0, 1]
    return ck


@pytest.mark.parametrize("part", ["latent", "generator", "optimiser"])
def test_a_checkpoint_that_does_not_fit_the_run_is_refused_on_one_line(model_flags, tmp_path, capsys, part):
    run = tmp_path / "run"
    clipguide.generate("a red circle", out_dir=run, steps=3, snapshots=(1,), **model_flags)
    ck = read_checkpoint(run / FILENAME)
    write_checkpoint(run / FILENAME, misfit(ck, part), ck.info)  # the damaged tensors get their own sha256
    assert read_checkpoint(run / FILENAME).step == 3  # so the file itself reads back whole
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError) as err:
        clipguide.resume(run, steps=5)
    message = str(err.value)
    assert message.startswith("the checkpoint does not fit this run (") and message.endswith("): it was not used")
    assert "\n" not in message, message
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files, "a refused resume wrote files"
    assert main(["resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("clipguide: resuming"), err  # no traceback
    assert err[1].startswith("clipguide: error: the checkpoint does not fit this run ("), err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
