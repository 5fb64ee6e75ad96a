"""The structure the code promises: one run function, a loop that takes its objective, models behind
declared interfaces, registries as tables, and a package without import circles or long functions."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import clipguide
from clipguide import get_preset, optimise
from clipguide.config import CUTS, INITS, LATENTS, LOSSES, OPTIMISERS, PRECISIONS
from clipguide.engine.interfaces import CodebookDecoder, Decoder, GuideModel, LogitEncoder
from clipguide.engine.objective import Objective, PixelObjective, PromptObjective, View
from clipguide.models.clip import ClipEnsemble
from clipguide.models.decoders import DECODERS, FILE_FORMATS, REGISTRY_FORMATS
from clipguide.testing import random_vqgan

from test_vqgan import TINY

PACKAGE = Path(clipguide.__file__).parent
SHAPES_CFG = dict(steps=3, size=64, cutn=2)


# ----------------------------------------------------------------------------- models behind interfaces


def test_the_adapters_implement_the_declared_interfaces(tiny_dvae, tiny_clip, shapes_models):
    vq = random_vqgan(TINY)
    assert isinstance(tiny_dvae, Decoder) and isinstance(tiny_dvae, LogitEncoder)
    assert not isinstance(tiny_dvae, CodebookDecoder)
    assert isinstance(vq, CodebookDecoder) and not isinstance(vq, LogitEncoder)
    decoder, clip = shapes_models
    assert isinstance(decoder, Decoder)
    for guide in (tiny_clip, clip, ClipEnsemble([clip, clip])):
        assert isinstance(guide, GuideModel)
    assert vq.blacklisted_codes() == [] and tiny_dvae.blacklisted_codes() == []  # only OpenAI's 8192 codes have one


def test_registries_are_tables_every_entry_resolves():
    for name, entry in DECODERS.items():
        assert entry["format"] in REGISTRY_FORMATS, name
        assert entry["kind"] in ("dvae", "vqgan"), name
        assert REGISTRY_FORMATS[entry["format"]].files(name, entry), name
    assert [p for p, _ in FILE_FORMATS] and all(callable(load) for _, load in FILE_FORMATS)


@pytest.mark.parametrize("field, names", [("latent", LATENTS), ("init", INITS), ("cut", CUTS), ("loss", LOSSES),
                                          ("optimiser", OPTIMISERS), ("precision", PRECISIONS)])
def test_every_name_a_config_accepts_runs(field, names, shapes_models):
    """Each name list is its table's keys: every name the config accepts is implemented."""
    decoder, clip = shapes_models
    extra = {"cut": {"uniform": dict(cut_range=(0.5, 0.9)), "normal": dict(cut_range=(0.8, 0.3, 0.5, 0.98)),
                     "pooled": dict(cut_whole=0.0, cut_flip=False)},  # every pooled view is whole already
             "init": {"onehot-codes": dict(init_codes=(1, 2, 3))}}
    for name in names:
        change = {field: name, **extra.get(field, {}).get(name, {})}
        if field == "latent" and name != "categorical":
            change.update(pyramid=(), pyramid_every=0)
        if name == "zquantize" or (field == "init" and name == "randn"):
            continue  # zquantize needs a VQGAN (tested in test_vqgan); randn is every Aleph preset's
        cfg = get_preset("shapes").replace(prompts=("a red circle",), steps=1, size=64, cutn=2, **change)
        assert optimise(cfg, decoder, clip).losses.shape == (2, 1), change


# ----------------------------------------------------------------------------- the loop takes its objective


class Constant:
    """An extra term adding ``value`` to every run's loss (no gradient)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, view: View) -> torch.Tensor:
        return torch.full((view.image.shape[0],), self.value)


def test_an_extra_term_composes_without_editing_the_loop(shapes_models):
    decoder, clip = shapes_models
    from clipguide.engine.prompts import encode_targets

    cfg = get_preset("shapes").replace(prompts=("a red circle on a blue background",), **SHAPES_CFG).resolved()
    plain = optimise(cfg, decoder, clip)
    targets = encode_targets(clip, list(cfg.prompts), cfg, [cfg.seed])
    guide = PromptObjective(cfg, clip, targets)
    shifted = optimise(cfg, decoder, clip, objective=Objective(guide, [Constant(1.5)]))
    assert torch.allclose(shifted.losses, plain.losses + 1.5)
    assert torch.equal(shifted.images, plain.images)  # a constant has no gradient: the same run


def test_a_pixel_objective_needs_no_clip_and_pulls_toward_its_target(shapes_models):
    decoder, _ = shapes_models
    cfg = get_preset("shapes").replace(prompts=("fit",), steps=30, size=64).resolved()
    target = torch.zeros(1, 3, 64, 64)
    target[:, 0] = 1.0  # red
    result = optimise(cfg, decoder, None, objective=Objective(PixelObjective(target)))
    assert result.models["clip"] is None and math.isnan(float(result.similarities[-1, 0]))
    assert result.losses[-1, 0] < 0.5 * result.losses[0, 0]
    assert result.images[0, 0].mean() > result.images[0, 1:].mean() + 0.3


# ----------------------------------------------------------------------------- one run function


@pytest.fixture
def counted_sessions(monkeypatch):
    """Every call of run_session, recorded (the callers import it from clipguide.run.session)."""
    import importlib

    calls = []
    modules = [importlib.import_module(m) for m in ("clipguide.run.generation", "clipguide.run.resume",
                                                    "clipguide.run.replay", "clipguide.sweeps.worker", "clipguide.commands")]
    real = modules[0].run_session

    def counting(cfg, out_dir=None, **kw):
        calls.append(out_dir)
        return real(cfg, out_dir, **kw)

    for module in modules:
        monkeypatch.setattr(module, "run_session", counting)
    return calls


def test_every_caller_runs_through_run_session(counted_sessions, tmp_path):
    from clipguide.audit.bias import audit_bias
    from clipguide.cli import main

    prompt = "a red circle on a blue background"
    clipguide.generate(prompt, "shapes", out_dir=tmp_path / "a", **SHAPES_CFG)
    assert main(["generate", prompt, "--preset", "shapes", "--out", str(tmp_path / "b"), "--steps", "2", "--size", "64", "--cutn", "2",
                 "--quiet"]) == 0
    clipguide.resume(tmp_path / "b", steps=3)
    clipguide.replay(tmp_path / "a", out_dir=tmp_path / "c")
    audit_bias([prompt], ("a red shape", "a green shape"), images_per_prompt=2, preset="shapes", out_dir=tmp_path / "d", **SHAPES_CFG)
    clipguide.sweep({**SHAPES_CFG, "preset": "shapes", "axes": {"prompt": [prompt]}}, tmp_path / "e", progress=False)  # also the seed experiments
    assert [Path(p).name for p in counted_sessions] == ["a", "b", "b", "c", "batch_00", "00-a-red-circle-on-a-blue-background"]


def test_run_session_writes_checkpoints_with_every_folder(tmp_path):
    """The folder's parts come in one order, from one place: replay and audits keep checkpoints too."""
    clipguide.replay(clipguide.generate("a red circle", "shapes", out_dir=tmp_path / "a", **SHAPES_CFG) and tmp_path / "a",
                     out_dir=tmp_path / "b")
    for run in ("a", "b"):
        assert {p.name for p in (tmp_path / run).iterdir()} >= {"manifest.json", "contact_sheet.png",
                                                                 "checkpoint.safetensors", "step_000003.png"}


# ----------------------------------------------------------------------------- the package's shape


def package_graph():
    """module -> (modules it imports at load time, [(line, module) imported inside a function])."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        typing_only = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"
                       for x in ast.walk(n)}
        in_function = {id(x) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for x in ast.walk(f) if x is not f}
        top, inner = set(), []
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.level or id(node) in typing_only:
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            found = [t for t in dict.fromkeys(found) if t in modules and t != name]
            if id(node) in in_function:
                inner += [(node.lineno, t) for t in found]
            else:
                top.update(found)
        graph[name] = (top, inner)
    return graph


def test_no_import_circles():
    graph = {m: top for m, (top, _) in package_graph().items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_package_imports_inside_functions_only_where_the_import_is_heavy():
    """The CLI imports its commands (torch) under its Ctrl-C handler, and ``train-shapes`` the training
    code only to train; nothing else hides an import."""
    inner = {m: [t for _, t in lines] for m, (_, lines) in package_graph().items() if lines}
    assert inner == {"clipguide.cli": ["clipguide.commands"], "clipguide.commands": ["clipguide.shapes.train"]}


def test_functions_and_modules_stay_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 600:
            long.append(f"{path.name}: {len(text.splitlines())} lines")
        for f in ast.walk(ast.parse(text)):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([f.lineno] + [d.lineno for d in f.decorator_list])
                if f.end_lineno - start + 1 > 60:
                    long.append(f"{path.name}:{f.lineno} {f.name}: {f.end_lineno - start + 1} lines")
    assert not long, long
