"""Checkpoints and resuming, in process on tiny random-weight models: bit-identical continuation
from any step, the checkpoint file and its checks, the non-finite guard, resume's refusals."""

import json
import os
import signal

import pytest
import torch

import clipguide
from clipguide import CheckpointError, ConfigError, NonFiniteError, WeightsError, get_preset, optimise
from clipguide.checkpoint import FILENAME, Checkpointer, read_checkpoint, write_checkpoint
from clipguide.cli import main
from clipguide.optimise import deferred_interrupt
from clipguide.snapshots import read_manifest

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
    rc = main(["generate", "x", "--decoder", str(dec), "--clip", str(clip), "--size", "32", "--cutn", "2",
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
    "garbage": (lambda d: os.urandom(4096), "corrupt"),
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


# ----------------------------------------------------------------------------- resume of run directories


@pytest.fixture
def model_flags(tiny_model_files):
    dec, clip = tiny_model_files
    return dict(decoder=str(dec), clip=str(clip), size=32, cutn=2)


class Crash(Exception):
    """A stand-in for a crash: nothing after it runs (no finish, no final checkpoint)."""


def crash_at(step):
    def cb(state):
        if state.step == step:
            raise Crash

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
        clipguide.generation.cached_decoder.cache_clear()
        with pytest.raises(WeightsError, match="models differ"):
            clipguide.resume(run)
    finally:
        weights.write_bytes(saved)
        clipguide.generation.cached_decoder.cache_clear()


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
