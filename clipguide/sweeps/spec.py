"""A sweep spec and its points.

A spec is a JSON/YAML object (or the same dict in Python): a base ``preset``, config fields that
override it, and ``axes`` whose values are expanded to a grid, e.g.::

    {"preset": "shapes", "steps": 4, "axes": {"prompt": ["a red circle", "a blue square"], "seed": [0, 1]}}

An axis is ``prompt``, ``seed``, ``preset`` or any :class:`~clipguide.config.RunConfig` field; its
values are a list, or ``{"file": "prompts.txt"}`` (one value per line, ``#`` comments skipped).
``zip`` lists groups of axes that vary together instead of across each other (like Python's
``zip``).  The keys of :data:`SWEEP_KEYS` configure the sweep itself; any other key is a
``RunConfig`` field.  Each point of the grid is one run (one prompt, one seed).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError, error_detail
from ..presets import DEFAULT_PRESET, fit_to_preset, get_preset

#: the sweep's own keys (anything else in a spec is a RunConfig field) -> what they set
SWEEP_KEYS = {
    "preset": "the base preset [shapes]",
    "prompt": "the prompt of every point, when prompt is not an axis",
    "axes": "axis name -> list of values (or {\"file\": PATH}), expanded to a grid",
    "zip": "lists of axes that vary together (equal lengths) instead of across each other",
    "max_batch": "runs optimised together at most, among points that differ only in prompt and seed "
                 "[local: 8 on a GPU, 1 on the CPU; ray: 1]",
    "checkpoint_every": "steps between checkpoints of each run [the run's default]",
    "score": "a CLIP spec: record each point's CLIP score against its prompt with it",
    "classify": "{\"labels\": \"imagenet\" or a list, \"clip\": SPEC}: classify each final image zero-shot",
    "sheet": "the two axes the contact sheet is laid out by, rows then columns [the first two axes]",
}
#: axes that are not RunConfig fields of the same name
SPECIAL_AXES = ("prompt", "seed", "preset")
#: fields a spec may not set: the sweep makes them from its points
OWNED_FIELDS = {"prompts": "use the prompt axis (or \"prompt\" for one)", "batch": "use the seed axis; max_batch groups runs"}


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its index in the grid, its axis values and its config (one prompt, one seed)."""

    index: int
    values: dict
    preset: str
    config: RunConfig

    @property
    def prompt(self) -> str:
        return self.config.prompts[0]


@dataclass
class SweepSpec:
    """A sweep spec, checked: :meth:`from_dict` / :meth:`from_file`, then :meth:`points`."""

    preset: str = DEFAULT_PRESET
    fields: dict = field(default_factory=dict)  # RunConfig overrides of every point
    axes: dict = field(default_factory=dict)  # axis -> list of values
    zip: list = field(default_factory=list)  # lists of axis names
    options: dict = field(default_factory=dict)  # the other SWEEP_KEYS that were given
    _points: list | None = field(default=None, init=False, repr=False, compare=False)  # built once (points())

    @classmethod
    def from_file(cls, path) -> SweepSpec:
        """A spec from a ``.json``, ``.yaml`` or ``.yml`` file (axis files relative to its folder)."""
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read the sweep spec {path} ({e.strerror or type(e).__name__}): check the path") from None
        return cls.from_dict(parse_spec_text(text, path), base=path.parent)

    @classmethod
    def from_dict(cls, data, base: Path | None = None) -> SweepSpec:
        """A spec from its JSON object; every point is built once here, so a bad spec fails before anything runs."""
        if not isinstance(data, dict):
            raise ConfigError(f"a sweep spec is an object of keys, not {type(data).__name__}: e.g. "
                              '{"preset": "shapes", "axes": {"seed": [0, 1]}}')
        data = dict(data)
        axes = {name: axis_values(name, values, base) for name, values in check_axes(data.pop("axes", {})).items()}
        zipped = check_zip(data.pop("zip", []), axes)
        options = {k: data.pop(k) for k in list(data) if k in SWEEP_KEYS and k != "preset"}
        preset = data.pop("preset", DEFAULT_PRESET)
        unknown = [k for k in data if k not in RunConfig.__dataclass_fields__]
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in the sweep spec: a key is one of {', '.join(SWEEP_KEYS)} "
                              "or a config field (see clipguide generate --help)")
        for name, fix in OWNED_FIELDS.items():
            if name in data or name in axes:
                raise ConfigError(f"a sweep sets {name!r} itself: {fix}")
        check_options(options, axes)
        spec = cls(preset, data, axes, zipped, options)
        spec.points()  # validates every point
        return spec

    def to_dict(self) -> dict:
        """The spec as JSON, with axis files read in (what ``sweep.json`` records)."""
        return {"preset": self.preset, **self.fields, **self.options, "axes": self.axes,
                **({"zip": self.zip} if self.zip else {})}

    def dimensions(self) -> list[list[str]]:
        """The grid's dimensions in axis order: each a list of axes (one, or a zip group)."""
        dims, seen = [], set()
        for name in self.axes:
            if name not in seen:
                group = next((g for g in self.zip if name in g), [name])
                dims.append(list(group))
                seen.update(group)
        return dims

    def points(self) -> list[Point]:
        """Every point of the grid, in order (the last axis varies fastest); built, and every config checked,
        on the first call only (an audit of 50 occupations x 16 seeds has 800)."""
        if self._points is None:
            dims = self.dimensions()
            points = []
            for combo in itertools.product(*(range(len(self.axes[d[0]])) for d in dims)):
                values = {name: self.axes[name][i] for d, i in zip(dims, combo) for name in d}
                points.append(make_point(len(points), values, self))
            check_distinct(points)
            self._points = points
        return list(self._points)


def parse_spec_text(text: str, path: Path):
    """The JSON or YAML object of a spec file."""
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # an optional dependency: Ray and the VQGAN extra install it
        except ImportError:
            raise ConfigError(f"reading {path} needs PyYAML (pip install pyyaml): or write the spec as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"the sweep spec {path} is not valid YAML ({error_detail(e)})") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"the sweep spec {path} is not valid JSON ({error_detail(e)}): "
                          "name it .yaml for YAML") from None


def check_axes(axes) -> dict:
    """The axes object, checked for shape: names are special axes or RunConfig fields."""
    if not isinstance(axes, dict):
        raise ConfigError(f"\"axes\" is an object of axis name -> list of values, not {type(axes).__name__}")
    known = {f for f in RunConfig.__dataclass_fields__ if f not in OWNED_FIELDS} | set(SPECIAL_AXES)
    for name in axes:
        if name not in known:
            raise ConfigError(f"unknown axis {name!r}: an axis is prompt, seed, preset or a config field "
                              f"(see clipguide generate --help)")
    return axes


def axis_values(name: str, values, base: Path | None) -> list:
    """An axis's values: a non-empty list, or the lines of ``{"file": PATH}``."""
    if isinstance(values, dict) and set(values) == {"file"}:
        path = Path(values["file"]).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ConfigError(f"axis {name}: cannot read {path} ({e.strerror or type(e).__name__})") from None
        values = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not isinstance(values, list):
        raise ConfigError(f"axis {name} is {values!r:.60}: give a list of values, or {{\"file\": PATH}}")
    if not values:
        raise ConfigError(f"axis {name} is empty: give it at least one value, or drop it")
    return values


def check_zip(zipped, axes: dict) -> list:
    """The zip groups: lists of two or more axes, each in one group, of equal lengths."""
    if not isinstance(zipped, list) or not all(isinstance(g, list) for g in zipped):
        raise ConfigError("\"zip\" is a list of lists of axis names, e.g. [[\"prompt\", \"init_image\"]]")
    seen = set()
    for group in zipped:
        missing = [a for a in group if a not in axes]
        if len(group) < 2 or missing or seen & set(group):
            raise ConfigError(f"zip group {group}: name two or more axes, each in one group only"
                              + (f" ({', '.join(map(str, missing))} is not an axis)" if missing else ""))
        lengths = {a: len(axes[a]) for a in group}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"zip group {group} has axes of different lengths {lengths}: zipped axes need equal lengths")
        seen.update(group)
    return zipped


def check_options(options: dict, axes: dict) -> None:
    """The sweep's own keys, checked for type."""
    for key in ("max_batch", "checkpoint_every"):
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"\"{key}\" is {value!r:.40}: give a whole number of at least 1")
    if not isinstance(options.get("score", ""), str):
        raise ConfigError("\"score\" is the CLIP that scores each point, e.g. \"shapes\"")
    classify = options.get("classify")
    if classify is not None and not (isinstance(classify, dict) and set(classify) <= {"labels", "clip"}):
        raise ConfigError("\"classify\" is {\"labels\": \"imagenet\" or a list of labels, \"clip\": SPEC}")
    sheet = options.get("sheet")
    if sheet is not None and not (isinstance(sheet, list) and 1 <= len(sheet) <= 2 and set(sheet) <= set(axes)):
        raise ConfigError(f"\"sheet\" is {sheet!r:.60}: name one or two axes (rows, then columns), "
                          f"of {', '.join(axes) or 'none: this sweep has no axes'}")


def make_point(index: int, values: dict, spec: SweepSpec) -> Point:
    """A point's config: the preset's, then the spec's fields, then the point's axis values."""
    preset = values.get("preset", spec.preset)
    fields = {**spec.fields, **{k: v for k, v in values.items() if k not in ("prompt", "preset")}}
    prompt = values.get("prompt", spec.options.get("prompt"))
    where = f"sweep point {index} ({', '.join(f'{k}={v!r:.40}' for k, v in values.items()) or 'no axes'})"
    if not isinstance(prompt, str):
        raise ConfigError(f"{where} has no prompt: add a prompt axis, or \"prompt\": \"...\"")
    try:
        base = get_preset(preset)
        config = RunConfig.from_dict({**base.to_dict(), **fit_to_preset(base, fields), "prompts": [prompt], "batch": 1})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {error_detail(e)}") from None
    return Point(index, values, preset, config)


def check_distinct(points: list[Point]) -> None:
    """Two points with the same preset and config would be the same run twice."""
    seen = {}
    for p in points:
        key = (p.preset, p.config.to_json())
        if key in seen:
            raise ConfigError(f"sweep points {seen[key]} and {p.index} are the same run ({p.values}): "
                              "remove the repeated axis value")
        seen[key] = p.index
