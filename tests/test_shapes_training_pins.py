"""The training arithmetic of the shapes models pinned bit for bit: every shipped stage, run tiny.

The stages run one after another into one folder, as ``train_shapes`` chains them (a stage reads
what the earlier ones wrote), each for a few steps with small batches, on one thread.  What is hashed:
the tensors of the safetensors file the stage wrote (names, dtypes, shapes and bytes) and its json
without the timings; then the model card written from those json files (timings set to 0).

The hashes were recorded at 239fbd9 on ``clipguide/shapes/train.py`` before it was split into
``clipguide.shapes.training``; a refactor must keep them.  To print new ones after an intended
change of behaviour: ``CLIPGUIDE_PIN_RECORD=1 python -m pytest tests/test_shapes_training_pins.py -s``.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipguide.paths import SHAPES_MODELS
from pins import RECORD, pins_for
from clipguide.shapes import training as T

EVAL = {"eval_scenes": 20}  # the decoders' reconstructions measured on 20 scenes, not 200
ROBUSTNESS = {"robustness_steps": 2}  # the CLIP's pixel robustness check: 2 steps, not 150
# (stage, steps, keyword arguments): the clip stage runs past its pool's recycling age (40 steps)
TINY = [
    ("clip", 41, dict(batch=4, n_neg=2, n_adv=4, adv_start=0.0, log_every=20, **ROBUSTNESS)),
    ("dvae", 3, dict(batch=2, crop=48, **EVAL)),
    ("dvaeft", 2, dict(batch=2, crop=64, **EVAL)),
    ("vqgan", 5, dict(batch=2, crop=64, full_frac=0.4, restart_every=2, **EVAL)),
    ("vqganft", 5, dict(batch=2, crop=64, full_frac=0.4, restart_every=2, **EVAL)),
    ("clipft", 3, dict(batch=4, n_neg=2, n_adv=2, tokens=4, recycle=2, **ROBUSTNESS)),
    ("clipframe", 2, dict(batch=4, n_neg=2, n_cut=2)),
    ("cliprobust", 2, dict(batch=4, n_neg=2, n_cut=2, polish_steps=2, **ROBUSTNESS)),
    ("prior", 2, dict(batch=4, train_scenes=16, held_out=4, eval_samples=2)),
    ("priorft", 2, dict(batch=4, train_scenes=16, held_out=4, eval_samples=2)),
    ("clipprior", 2, dict(samples=8, batch=4, n_neg=2, n_pos=2, n_spoilt=2)),
]
# stage: (tensors, json without timings), per CPU vendor (tests/pins.py).  AuthenticAMD: recorded at 239fbd9 (the
# prior's: when it was added); GenuineIntel: recorded in the twenty-first round from the same code.
PINNED = {
    "AuthenticAMD": {
        "clip": ("2a32f8d31a2cd117", "22132735c86e7235"),
        "dvae": ("278e923c7135749e", "14f91d9004cd15c7"),
        "dvaeft": ("1ac45447952f36e5", "78e9da8b94d3d9c8"),
        "vqgan": ("82f06dab6ba5a87f", "db2f66c4da5b02f1"),
        "vqganft": ("5a97c3c279dbb5bf", "8f3183c660a7ba05"),
        "clipft": ("24e793f3d3caa27f", "4783dadb52186ebb"),
        "clipframe": ("f8b74f3c87656b8b", "bff379717f693c0d"),
        "cliprobust": ("5f856e3f4f55cb67", "9c08dc64550c085d"),
        "prior": ("7c539169651a24a9", "c275aedc89d162c0"),  # the token prior stage, added later (json: threads since round 18)
        "priorft": ("ce1392230430b21c", "780fd69e58021dab"),  # its continuation (seventeenth round; its json lists the runs since the 18th)
        "clipprior": ("dc2aa5e20fabed2b", "223dadfcaa1068b7"),  # the CLIP fitted to the prior's rated samples (nineteenth round)
    },
    "GenuineIntel": {
        "clip": ("bfde8311ae9b580f", "376d3c703d3f4a96"),
        "dvae": ("7c9a8cfd8fef0b3d", "14f91d9004cd15c7"),
        "dvaeft": ("b1c120c094969376", "78e9da8b94d3d9c8"),
        "vqgan": ("afb8f0e6af7ae22e", "5331502edc6527da"),
        "vqganft": ("c951d319809458e5", "e14c3d72f9c81ebf"),
        "clipft": ("8ad75a29a6d901c1", "4ab5c01f41cde3d1"),
        "clipframe": ("e69de40caab94572", "5ae610cb00d7c42b"),
        "cliprobust": ("625208d8c39b0976", "a95819ed9480940f"),
        "prior": ("c550b7b7d50756d8", "a8a00bcd03d7a14a"),
        "priorft": ("9c946ff9bdbc8517", "f2e1cabbffda635e"),
        "clipprior": ("036dee59d745bd92", "c3630c03622c893e"),
    },
}
# the card of the tiny run, with the prior's section, its priorft lines, and clipprior's lines (nineteenth round)
PINNED_CARD = {"AuthenticAMD": "2846eef5d04bb546", "GenuineIntel": "179387228301b63c"}
MODEL = {"clip": "clip", "dvae": "dvae", "dvaeft": "dvae", "vqgan": "vqgan", "vqganft": "vqgan", "clipft": "clip",
         "clipframe": "clip", "cliprobust": "clip", "prior": "prior", "priorft": "prior", "clipprior": "clip"}


def tensors_digest(path) -> str:
    tensors = load_file(str(path))
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return h.hexdigest()[:16]


def _timings(meta, value=None):
    """``meta`` without its "seconds" entries (``value`` None) or with them all set to ``value``."""
    if isinstance(meta, dict):
        return {k: (value if k == "seconds" else _timings(v, value)) for k, v in meta.items()
                if k != "seconds" or value is not None}
    if isinstance(meta, list):
        return [_timings(v, value) for v in meta]
    return meta


def meta_digest(path) -> str:
    meta = _timings(json.loads(path.read_text()))
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The stages run tiny into one folder: (folder, stage -> (tensors digest, json digest))."""
    out = tmp_path_factory.mktemp("shapes-training")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = {}
        for stage, steps, options in TINY:
            T.run_stage(stage, out, seed=0, steps=steps, **options)
            name = f"shapes-{MODEL[stage]}"
            got[stage] = (tensors_digest(out / f"{name}.safetensors"), meta_digest(out / f"{name}.json"))
    finally:
        torch.set_num_threads(threads)
    if RECORD:
        print("\nPINNED = {", *(f"    {k!r}: {v!r}," for k, v in got.items()), "}", sep="\n")
    return out, got


def test_every_shipped_stage_keeps_its_arithmetic(chain):
    _, got = chain
    assert [stage for stage, *_ in TINY] == list(T.STAGES)  # every stage, in the order of a whole run
    assert got == pins_for(PINNED, __file__)


def test_the_model_card_of_the_tiny_run_keeps_its_text(chain, tmp_path):
    out, _ = chain
    for f in out.glob("shapes-*.*"):  # timings set to 0; the weights' sizes count, so they come too
        data = f.read_bytes() if f.suffix != ".json" else \
            (json.dumps(_timings(json.loads(f.read_text()), 0.0), indent=1) + "\n").encode()
        (tmp_path / f.name).write_bytes(data)
    card = T.write_model_card(tmp_path).read_text()
    if RECORD:
        print("PINNED_CARD =", repr(hashlib.sha256(card.encode()).hexdigest()[:16]))
    assert hashlib.sha256(card.encode()).hexdigest()[:16] == pins_for(PINNED_CARD, __file__)


def test_the_shipped_model_card_is_what_the_card_writer_writes(tmp_path):
    for f in SHAPES_MODELS.glob("shapes-*.*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    assert T.write_model_card(tmp_path).read_text() == (SHAPES_MODELS / "MODEL_CARD.md").read_text()
