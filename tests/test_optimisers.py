"""Optimisers by name (issue 37, nerdyrodent's -opt): any torch.optim optimiser and DiffGrad/AdamP from
torch-optimizer, with their options; each changes the trajectory and resumes bit for bit."""

from __future__ import annotations

import sys

import pytest
import torch

from clipguide import ConfigError, RunConfig, get_preset, optimise
from clipguide.cli import main
from clipguide.commands import build_parser
from clipguide.config import OPTIMISERS
from clipguide.engine.optimisers import OPTIMISER_CLASSES, make_optimiser
from clipguide.records.checkpoints import read_checkpoint, write_checkpoint

SMALL = dict(size=32, cutn=2, decoder="t", clip="t", prompts=("a red circle",), steps=5)


def cfg_of(**kw):
    return get_preset("shapes").replace(**{**SMALL, **kw})


def test_nerdyrodents_optimisers_and_torchs_are_names_in_any_case():
    for name in ("Adam", "AdamW", "Adagrad", "Adamax", "DiffGrad", "AdamP", "RAdam", "RMSprop", "SGD", "NAdam"):
        assert name.lower() in OPTIMISERS and RunConfig(optimiser=name).optimiser == name.lower()
    args = build_parser().parse_args(["generate", "x", "--optimiser", "RMSprop"])
    assert args.optimiser == "rmsprop"
    assert list(OPTIMISERS) == list(OPTIMISER_CLASSES)  # the name list is the table's keys


def test_options_reach_the_optimiser_and_change_its_steps():
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_optimiser(RunConfig(optimiser="sgd", lr=0.1, optimiser_options="momentum=0.5"), [p])
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.5
    for _ in range(2):
        p.grad = torch.ones(3)
        opt.step()
    # buffer 1, then 0.5 * 1 + 1: 1 - 0.1 - 0.15 (without momentum: 1 - 0.2)
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.75))
    q = torch.nn.Parameter(torch.ones(3))
    opt = make_optimiser(RunConfig(optimiser="adam", optimiser_options='{"betas": [0.5, 0.9]}'), [q])
    assert opt.param_groups[0]["betas"] == (0.5, 0.9)


def test_one_spelling_per_set_of_options():
    a = RunConfig(optimiser="rmsprop", optimiser_options="momentum=0.9, centered=True")
    b = RunConfig(optimiser="rmsprop", optimiser_options='{"centered": true, "momentum": 0.9}')
    assert a.optimiser_options == b.optimiser_options == "centered=true,momentum=0.9"
    assert RunConfig(optimiser="adam", optimiser_options="betas=(0.5,0.99)").optimiser_options == "betas=[0.5,0.99]"


def test_weight_decay_goes_to_every_optimiser_that_takes_one_and_adam_refuses_it():
    p = torch.nn.Parameter(torch.ones(2))
    assert make_optimiser(RunConfig(optimiser="sgd", weight_decay=0.5), [p]).param_groups[0]["weight_decay"] == 0.5
    assert make_optimiser(RunConfig(optimiser="adagrad", weight_decay=0.5), [p]).param_groups[0]["weight_decay"] == 0.5
    with pytest.raises(ConfigError, match="adam is Aleph2Image's Adam without decay; use --optimiser adamw"):
        RunConfig(optimiser="adam", weight_decay=0.5)  # it used to be ignored without a word
    assert make_optimiser(RunConfig(optimiser="adam"), [p]).param_groups[0]["weight_decay"] == 0
    opt = make_optimiser(RunConfig(optimiser="adam", optimiser_options="weight_decay=0.25"), [p])
    assert opt.param_groups[0]["weight_decay"] == 0.25  # Adam's own L2 decay, as an option


def test_another_optimiser_takes_another_trajectory(tiny_dvae, tiny_clip):
    runs = {name: optimise(cfg_of(optimiser=name, lr=0.1), tiny_dvae, tiny_clip) for name in ("adamw", "adagrad", "rmsprop")}
    for name in ("adagrad", "rmsprop"):
        assert torch.equal(runs[name].losses[0], runs["adamw"].losses[0])  # the same start
        assert not torch.equal(runs[name].latent, runs["adamw"].latent), name
    with_momentum = optimise(cfg_of(optimiser="rmsprop", lr=0.1, optimiser_options="momentum=0.9"), tiny_dvae, tiny_clip)
    assert not torch.equal(with_momentum.latent, runs["rmsprop"].latent)


RESUMED = ["adagrad", "rmsprop:momentum=0.9,centered=true", "sgd:momentum=0.9,nesterov=true", "nadam", "diffgrad", "adamp"]


@pytest.mark.parametrize("spec", RESUMED)
def test_any_optimiser_resumes_bit_for_bit_from_a_checkpoint_file(tiny_dvae, tiny_clip, tmp_path, spec):
    name, _, options = spec.partition(":")
    if name in ("diffgrad", "adamp"):
        pytest.importorskip("torch_optimizer")
    cfg = cfg_of(optimiser=name, optimiser_options=options, lr=0.1, snapshots=(2, 5))
    saved = {}

    def keep(state):
        if state.step == 3:
            write_checkpoint(tmp_path / "ck.safetensors", state.checkpoint())
            saved[3] = read_checkpoint(tmp_path / "ck.safetensors")

    full = optimise(cfg, tiny_dvae, tiny_clip, keep)
    assert saved[3].optimiser["state"], "the optimiser's state is in the checkpoint"
    resumed = optimise(cfg, tiny_dvae, tiny_clip, resume_from=saved[3])
    assert torch.equal(full.latent, resumed.latent) and torch.equal(full.losses, resumed.losses)
    assert torch.equal(full.snapshots[5], resumed.snapshots[5]) and torch.equal(full.images, resumed.images)


@pytest.mark.parametrize("flags, parts", [
    (["--optimiser", "sgd", "--optimiser-options", "momentun=0.9"], ["momentun is not an option of SGD", "momentum"]),
    (["--optimiser", "lbfgs"], ["invalid choice: 'lbfgs'", "rmsprop"]),  # RunConfig says why: below
    (["--optimiser", "rprop", "--weight-decay", "0.1"], ["Rprop takes no weight decay"]),
    (["--optimiser", "adam", "--weight-decay", "0.1"], ["without decay", "--optimiser-options weight_decay=0.1"]),
    (["--optimiser", "sgd", "--optimiser-options", "momentum=-1"], ["SGD refuses them", "momentum"]),
    (["--optimiser", "adamw", "--optimiser-options", "lr=1"], ["set it with --lr"]),
    (["--optimiser-options", "momentum"], ["is not key=value"]),
])
def test_bad_optimisers_and_options_are_one_line_exit_2(capsys, tmp_path, flags, parts):
    assert main(["generate", "x", "--out", str(tmp_path / "o"), "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(p in err for p in parts), err
    assert not (tmp_path / "o").exists()


def test_an_optimiser_left_out_is_refused_saying_why():
    with pytest.raises(ConfigError, match="lbfgs is not supported: its step.. needs a closure"):
        RunConfig(optimiser="LBFGS")


def test_diffgrad_without_torch_optimizer_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_optimizer", None)  # as if not installed: importing it fails
    with pytest.raises(ConfigError, match=r"clipguide\[optimizers\]") as e:
        RunConfig(optimiser="diffgrad")
    assert "\n" not in str(e.value)
    assert RunConfig(optimiser="radam").optimiser == "radam"  # the others do not need it
