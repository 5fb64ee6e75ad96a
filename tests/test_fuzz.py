"""Fuzzing (hypothesis) of what users and files hand clipguide: prompts built from the grammar's own
tokens, damaged manifests, random command lines. Only clipguide's own errors may escape, every
message is one line, and the command line answers 0 or 2."""

import argparse
import contextlib
import copy
import io
import json

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clipguide import ClipguideError, ConfigError, PromptError, RunConfig, Snapshotter, get_preset
from clipguide import cli, commands
from clipguide.records.manifest import read_manifest
from clipguide.models import loading
from clipguide.records import images, lineage
from clipguide.engine.prompts import check_prompt

FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ----------------------------------------------------------------------------- prompts

PIECES = ["|", "^", "::", ":", "text:", "image:", "noise:", "-", "+", ".", ",", " ", "0", "1", "0.5", "-0.5", "1e309", "inf",
          "-inf", "nan", "99999999999999999999", "a", "red circle", "http://x/a.png", "a.png", "C:\\a.png", "\n", "\x00",
          "é", "»", "\u202e"]
prompt_texts = st.one_of(st.lists(st.sampled_from(PIECES), max_size=14).map("".join), st.text(max_size=40))


@FUZZ
@given(prompt_texts, st.integers(-3, 5))
def test_prompt_and_config_layer_raise_only_prompt_errors(text, every):
    try:
        check_prompt(text, every)
    except PromptError as e:
        assert len(str(e).splitlines()) == 1, str(e)
    try:
        RunConfig(prompts=(text,), story_every=every)
    except ConfigError as e:
        assert len(str(e).splitlines()) == 1, str(e)


# ----------------------------------------------------------------------------- manifests


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A real manifest of a batch (two prompts x two seeds, two snapshots) and its run directory."""
    run = tmp_path_factory.mktemp("fuzz") / "run"
    cfg = get_preset("shapes").replace(prompts=("a red circle", "blue:-0.5 | a square"), batch=2, steps=4, snapshots=(2,))
    saver = Snapshotter(run, cfg, {"decoder": {"name": "t", "sha256": "ab"}, "clip": {"name": "t", "sha256": None}})
    for step in (2, 4):
        saver.save(step, torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(step)), torch.zeros(4), torch.zeros(4))
    return run, json.loads((run / "manifest.json").read_text())


def paths_in(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield from paths_in(value, prefix + (key,))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2, 2**70) | st.floats() | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)


@st.composite
def damaged(draw, manifest: dict) -> str:
    """The manifest's JSON with values replaced or deleted, or its text truncated or altered."""
    m = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths_in(m))[1:] or [()]))
        if not path:
            break
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            parent[path[-1]] = draw(json_values)
        else:
            del parent[path[-1]]
    text = json.dumps(m)
    cut = draw(st.integers(0, len(text)))
    how = draw(st.sampled_from(["as is", "as is", "truncate", "replace"]))
    if how == "truncate":
        return text[:cut]
    if how == "replace":
        return text[:cut] + draw(st.text(min_size=1, max_size=3)) + text[cut + 1:]
    return text


@FUZZ
@given(data=st.data())
def test_manifest_reader_and_its_users_raise_only_clipguide_errors(recorded, data):
    run, manifest = recorded
    saved = (run / "manifest.json").read_bytes()
    try:
        (run / "manifest.json").write_text(data.draw(damaged(manifest)), encoding="utf-8", errors="surrogatepass")
        try:
            m = read_manifest(run)
            lineage.final_image(run / "run_00")
            lineage.run_prompt(run / "run_01")
            saver = Snapshotter(run, RunConfig.from_dict(m["config"]), m["models"], overwrite=True)
            saver.adopt(m, m["steps_done"])
            saver.save(99, torch.zeros(len(m["runs"]), 3, 8, 8))  # provenance reads the adopted record
        except ClipguideError as e:
            assert len(str(e).splitlines()) == 1, str(e)
    finally:
        (run / "manifest.json").write_bytes(saved)


# ----------------------------------------------------------------------------- the command line


class Reached(Exception):
    """The command got past its arguments to loading models: a valid command line (nothing is run)."""


def reached(*args, **kwargs):
    raise Reached


SUBCOMMANDS = next(a for a in commands.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
# train-shapes trains models; calibrate-filter renders --n scenes before its CLIP is loaded.
COMMANDS = [c for c in SUBCOMMANDS if c not in ("train-shapes", "calibrate-filter")]
OPTIONS = sorted({o for c in COMMANDS for action in SUBCOMMANDS[c]._actions for o in action.option_strings})
# Values without path separators or '..': whatever the fuzzer writes stays in its working directory.
safe_text = st.text(st.characters(blacklist_characters="/\\~", blacklist_categories=("Cs",)), max_size=10).filter(
    lambda t: ".." not in t)
tokens = st.one_of(st.sampled_from(OPTIONS), st.sampled_from(["0", "-1", "1", "3", "nan", "inf", "-inf", "1e9", "0.5", "a,b",
                                                              "1,,2", "", " ", "-", "--", "x.png", "image:x.png", "a ^ b",
                                                              "noise:-1", "cuda", "cpu", "shapes", "dalle", "run"]),
                   st.integers(-3, 2**70).map(str), safe_text)
command_lines = st.tuples(st.sampled_from([*COMMANDS, "bogus", ""]), st.lists(tokens, max_size=8)).map(lambda t: [t[0], *t[1]])


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """No model is loaded and no URL fetched; the working directory is a temporary one (the fuzzed values
    hold no path separators, so output folders land there)."""
    monkeypatch.chdir(tmp_path)
    for name in ("cached_clip", "cached_decoder"):  # what every load of models goes through
        monkeypatch.setattr(loading, name, reached)
    monkeypatch.setattr(images, "_download", lambda url: (_ for _ in ()).throw(OSError("offline")))


@settings(FUZZ, max_examples=250)
@given(command_lines)
@example(["blend", "\x00"])  # found by the fuzzer (seed 79): Path.resolve raised ValueError in the error message
def test_command_line_answers_0_or_2_with_one_line_errors(sandbox, argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = cli.main(argv)
        except Reached:
            return
    assert rc in (0, 2), (argv, rc, err.getvalue())
    if rc == 2:
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0], (argv, err.getvalue())
