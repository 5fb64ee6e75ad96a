"""The seed experiments as data, their scaled snapshots, the example settings, and the notebook helpers."""

import dataclasses
import json

import pytest
import torch

from clipguide import ConfigError
from clipguide.run.experiments import SEED_EXPERIMENTS, SHAPES_EXPERIMENTS, example_cutn, example_steps, run_experiments, scaled_snapshots, select_experiments, snapshot_unit, weights_present
from clipguide.notebook import LivePreview, snapshot_grid
from clipguide.engine.state import StepState

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_seed_experiments_are_the_published_list():
    assert SEED_EXPERIMENTS.prompts == (
        "an armchair in the shape of an avocado", "a rainbow cube", "Yu-Gi-Oh", "Sailor Moon", "Furby",
        "Dora the Explorer", "Teletubbies", "pokemon", "squirtle", "weedle", "digimon", "serenity", "utopia", "dystopia")
    assert (SEED_EXPERIMENTS.preset, SEED_EXPERIMENTS.steps, SEED_EXPERIMENTS.offline) == ("aleph2image", 4000, False)
    assert (SEED_EXPERIMENTS.labels, SEED_EXPERIMENTS.extra_labels) == ("imagenet", ("porn", "pokemon"))
    assert SHAPES_EXPERIMENTS.offline and SHAPES_EXPERIMENTS.preset == "shapes"


@pytest.mark.parametrize("steps, expected", [(4000, (100, 600, 4000)), (300, (10, 50, 300)), (1000, (30, 150, 1000)),
                                             (250, (10, 40, 250)), (40, (1, 6, 40)), (4, (1, 4)), (1, (1,))])
def test_snapshots_scale_with_the_run_to_round_steps(steps, expected):
    assert scaled_snapshots(steps) == expected


def test_scaled_snapshots_are_multiples_of_a_power_of_ten_up_to_the_last_step():
    assert [snapshot_unit(n) for n in (1, 24, 25, 249, 250, 300, 2499, 2500, 4000)] == \
        [1, 1, 1, 1, 10, 10, 10, 100, 100]
    for steps in [*range(1, 400), 999, 1000, 1001, 2500, 4000, 4321, 10**5]:
        unit, got = snapshot_unit(steps), scaled_snapshots(steps)
        assert unit * 25 <= max(steps, 25) < unit * 250  # the largest power of ten <= steps / 25, at least 1
        assert list(got) == sorted(set(got)) and got[-1] == steps and all(1 <= k <= steps for k in got), (steps, got)
        assert all(k % unit == 0 for k in got if k != steps), (steps, got)  # the last step is steps, round or not


def test_example_settings_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("CLIPGUIDE_EXAMPLE_STEPS", raising=False)
    monkeypatch.delenv("CLIPGUIDE_EXAMPLE_CUTN", raising=False)
    assert (example_steps(300), example_cutn(), example_cutn(8)) == (300, None, 8)
    monkeypatch.setenv("CLIPGUIDE_EXAMPLE_STEPS", "6")
    monkeypatch.setenv("CLIPGUIDE_EXAMPLE_CUTN", "2")
    assert (example_steps(300), example_cutn()) == (6, 2)
    monkeypatch.setenv("CLIPGUIDE_EXAMPLE_STEPS", "six")
    with pytest.raises(ConfigError, match="CLIPGUIDE_EXAMPLE_STEPS='six' is not a positive whole number"):
        example_steps(300)


def test_without_cached_weights_the_offline_stand_in_is_chosen(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPGUIDE_CACHE", str(tmp_path))
    assert weights_present("shapes") and not weights_present("aleph2image")
    (tmp_path / "dalle").mkdir()
    (tmp_path / "dalle" / "decoder.pkl").write_bytes(b"")  # the decoder alone is not enough: CLIP is missing
    assert not weights_present("aleph2image")
    assert select_experiments() is SHAPES_EXPERIMENTS and select_experiments(offline=False) is SEED_EXPERIMENTS


def test_run_experiments_gives_each_prompt_its_own_run(tmp_path):
    two = dataclasses.replace(SHAPES_EXPERIMENTS, groups={"g": SHAPES_EXPERIMENTS.prompts[:2]})
    dirs = run_experiments(two, tmp_path, steps=3, cutn=2, size=64)
    assert [d.name for d in dirs.values()] == ["00-a-red-circle-on-a-blue-background",
                                               "01-a-yellow-square-on-a-purple-background"]
    for prompt, d in dirs.items():
        manifest = json.loads((d / "manifest.json").read_text())
        assert [r["prompt"] for r in manifest["runs"]] == [prompt]
        assert [s["step"] for s in manifest["snapshots"]] == [1, 3] and (d / "contact_sheet.png").is_file()
    before = {d: (d / "manifest.json").read_bytes() for d in dirs.values()}
    assert run_experiments(two, tmp_path, steps=3, cutn=2, size=64) == dirs  # a finished sweep: nothing runs again
    assert {d: (d / "manifest.json").read_bytes() for d in dirs.values()} == before
    with pytest.raises(ConfigError, match="other settings.*--overwrite"):
        run_experiments(two, tmp_path, steps=4, cutn=2, size=64)


def state(step: int, steps: int = 10, runs: int = 2) -> StepState:
    images = torch.rand(runs, 3, 8, 8, generator=torch.Generator().manual_seed(step))
    return StepState(step, steps, torch.zeros(runs), torch.zeros(runs), 0.1, [], None, {}, lambda: images)


def test_live_preview_redraws_every_few_steps_and_at_the_end(monkeypatch):
    shown = []

    class Handle:
        def update(self, obj):
            shown.append(obj)

    def display(obj, display_id=False):
        shown.append(obj)
        return Handle()

    monkeypatch.setattr("IPython.display.display", display)
    preview = LivePreview(every=4, scale=2)
    for k in range(11):
        preview(state(k))
    assert preview.updates == 4  # steps 0, 4, 8 and the last, 10
    images = [o for o in shown if not isinstance(o, str)]
    assert len(images) == 4 and images[0].size == (2 * 2 * 8, 2 * 8)  # two runs side by side, scaled 2x
    assert [o for o in shown if isinstance(o, str)][-1].startswith("step 10/10")


def test_snapshot_grid_has_a_labelled_row_per_run_and_a_column_per_step():
    class Result:
        snapshots = {0: torch.zeros(2, 3, 8, 8), 5: torch.ones(2, 3, 8, 8)}
        images, steps_done = torch.ones(2, 3, 8, 8), 9
        runs = [("a red circle", 0), ("a red circle", 1)]

    grid = snapshot_grid(Result)
    assert grid.size == (3 * 8, 2 * (14 + 14 + 8))  # steps 0, 5, 9; contact_sheet's 14-pixel row and step labels
