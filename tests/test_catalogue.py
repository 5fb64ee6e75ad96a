"""The `clipguide presets` and `clipguide models` listings (clipguide.catalogue)."""

from __future__ import annotations

import dataclasses
import socket

import open_clip
import pytest

from clipguide import catalogue
from clipguide.models import weights
from clipguide.models.clip import RECOMMENDED_CLIPS
from clipguide.config import RunConfig
from clipguide.presets import COMMON_DEVIATIONS, DEFAULT_PRESET, PRESETS


class NetworkTouched(BaseException):
    """Not an Exception: the download code's `except Exception` and retries let it through."""


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty clipguide cache and no network: any connection attempt fails the test at once."""
    def refuse(*args, **kwargs):
        raise NetworkTouched(f"the listing touched the network: {args[:2]}")

    monkeypatch.setenv("CLIPGUIDE_CACHE", str(tmp_path))
    monkeypatch.setattr(weights, "is_reachable", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path


def _table_rows(text: str) -> dict[str, list[str]]:
    """Flag -> cells, over all column blocks of the verbose table."""
    table = text.split("config fields that differ between presets:")[1].split(catalogue.SAME_FIELDS_NOTE[:30])[0]
    rows: dict[str, list[str]] = {}
    for line in table.splitlines():
        if line and not line.startswith(" "):
            flag, *cells = line.split()
            rows.setdefault(flag, []).extend(cells)
    return rows


def test_default_preset_comes_first_then_table_order():
    lines = catalogue.format_presets().splitlines()
    assert lines[0] == f"{DEFAULT_PRESET} (default)"
    names = [line for line in lines if line and not line.startswith(" ")]
    assert names[1:] == [name for name in PRESETS if name != DEFAULT_PRESET] + ["deviations of every notebook preset:"]
    assert sum("(default)" in line for line in lines) == 1


def test_common_deviations_are_listed():
    text = " ".join(catalogue.format_presets(width=1000).split())
    assert all(" ".join(d.split()) in text for d in COMMON_DEVIATIONS)


def test_presets_wrap_to_width():
    for width in (60, 100):
        text = catalogue.format_presets(width=width)
        assert max(len(line) for line in text.splitlines()) <= width
    assert "deviations:" in text and "verbose" not in text and "config fields" not in text


def test_verbose_table_rows():
    text = catalogue.format_presets(verbose=True)
    rows = _table_rows(text)
    header = [p.name for p in catalogue.presets_in_order()]
    decoder = rows["decoder"]
    assert len(decoder) == len(PRESETS)
    assert decoder[0] == "shapes-dvae" and "dalle" in decoder
    assert dict(zip(header, rows["cut-range"]))["aleph2image-delta"] == "0.8,0.99"
    assert dict(zip(header, rows["pyramid"]))["shapes"] == "2,4"
    assert dict(zip(header, rows["cut-flip"]))["shapes"] == "on"
    assert dict(zip(header, rows["steps"]))["shapes"] == "300"
    # every row lists the fields in RunConfig's order, and only those that differ
    differing = [f.name for f in dataclasses.fields(RunConfig)
                 if f.name != "prompts" and len({repr(getattr(p.config, f.name)) for p in PRESETS.values()}) > 1]
    assert list(rows) == [name.replace("_", "-") for name in differing]
    same = next(f.name for f in dataclasses.fields(RunConfig)
                if f.name != "prompts" and len({repr(getattr(p.config, f.name)) for p in PRESETS.values()}) == 1)
    assert same.replace("_", "-") not in rows
    assert " ".join(text.split()).endswith(" ".join(catalogue.SAME_FIELDS_NOTE.split()))


def test_verbose_table_fits_width():
    lines = catalogue.format_presets(verbose=True, width=40).splitlines()
    assert any(len(line) > 40 for line in lines)  # vqgan-imagenet-f16-1024 cannot fit beside the flags
    for line in lines:
        # only a line holding a single value column too wide for the width may run over
        assert len(line) <= 40 or len(line.split()) == 2, line
    lines = catalogue.format_presets(verbose=True, width=80).splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "vqgan-gumbel" in " ".join(lines[lines.index("config fields that differ between presets:"):])


def test_short_value():
    assert catalogue.short_value((2, 4)) == "2,4"
    assert catalogue.short_value(()) == "none"
    assert catalogue.short_value(True) == "on" and catalogue.short_value(False) == "off"
    assert catalogue.short_value(10.0) == "10" and catalogue.short_value(1.005) == "1.005"
    assert catalogue.short_value((0.8, 0.99)) == "0.8,0.99"
    assert catalogue.short_value("") == "none" and catalogue.short_value(64) == "64"


def test_recommended_clips_are_downloadable():
    pretrained = {f"{name}/{tag}" for name, tag in open_clip.list_pretrained()}
    assert RECOMMENDED_CLIPS and set(RECOMMENDED_CLIPS) <= pretrained
    assert len(set(RECOMMENDED_CLIPS)) == len(RECOMMENDED_CLIPS)


def test_models_listing(offline):
    text = catalogue.format_models()
    lines = text.splitlines()
    more = next(i for i, line in enumerate(lines) if "more open_clip NAME/TAG models" in line)
    assert int(lines[more].split()[0]) == len(open_clip.list_pretrained()) - len(RECOMMENDED_CLIPS)
    assert lines[more].endswith("clipguide models --all")
    positions = [next(i for i, line in enumerate(lines) if line.split()[:1] == [spec]) for spec in RECOMMENDED_CLIPS]
    assert positions == sorted(positions) and positions[-1] < more
    shapes = next(line for line in lines if line.split()[:1] == ["shapes"])
    assert shapes.endswith("[shipped]")
    assert lines.index(shapes) < positions[0]
    for spec in RECOMMENDED_CLIPS:
        assert lines[positions[RECOMMENDED_CLIPS.index(spec)]].endswith(f"[{catalogue.NOT_CACHED}]")
    assert f"decoders (cache: {offline}):" in lines
    assert "shapes-dvae" in text and "[shipped]" in text and "A+B" in text and ".json" in text


def test_models_all_lists_every_pair(offline):
    text = catalogue.format_models(show_all=True)
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("  ") and "/" in line.split()[0]}
    assert listed == {f"{name}/{tag}" for name, tag in open_clip.list_pretrained()}
    assert "more open_clip" not in text


def _hf_repo(spec: str) -> str:
    name, tag = spec.split("/")
    return open_clip.get_pretrained_cfg(name, tag).get("hf_hub", "").rstrip("/")


def _fake_hf_cache(cache, spec: str) -> None:
    """Put ``spec``'s weights in the cache the way huggingface_hub's downloader leaves them."""
    repo = _hf_repo(spec)
    revision = "0" * 40
    root = cache / "open_clip" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"not really weights")


def test_cached_clips_show_as_cached(offline):
    recommended = RECOMMENDED_CLIPS[1]
    other = next(spec for spec in (f"{n}/{t}" for n, t in open_clip.list_pretrained())
                 if _hf_repo(spec) and _hf_repo(spec) not in {_hf_repo(r) for r in RECOMMENDED_CLIPS})
    for spec in (recommended, other):
        _fake_hf_cache(offline, spec)
        assert catalogue.clip_cached(spec)
    assert not catalogue.clip_cached(RECOMMENDED_CLIPS[0])
    # tags that share a Hugging Face repository (e.g. NAME and NAME-quickgelu) share the cached file
    repos = {_hf_repo(recommended), _hf_repo(other)}
    cached = {f"{n}/{t}" for n, t in open_clip.list_pretrained() if _hf_repo(f"{n}/{t}") in repos}
    lines = catalogue.format_models().splitlines()
    more = next(i for i, line in enumerate(lines) if "more open_clip NAME/TAG models" in line)
    marked = {line.split()[0] for line in lines[:more] if line.endswith("[cached]")}
    assert marked == cached and other in marked and recommended in marked  # all listed before the "more" line
    assert int(lines[more].split()[0]) == len(open_clip.list_pretrained()) - len(set(RECOMMENDED_CLIPS) | cached)


def test_decoder_status(offline):
    assert catalogue.decoder_status("shapes-dvae") == "shipped"
    assert catalogue.decoder_status("dalle") == catalogue.NOT_CACHED
    (offline / "dalle").mkdir()
    (offline / "dalle" / "decoder.pkl").write_bytes(b"")
    assert catalogue.decoder_status("dalle") == "cached"
    from clipguide.models.decoders import taming_cache_paths

    for path in taming_cache_paths("vqgan-gumbel-f8-8192"):
        path.parent.mkdir(exist_ok=True)
        assert catalogue.decoder_status("vqgan-gumbel-f8-8192") == catalogue.NOT_CACHED  # both files are needed
        path.write_text("")
    assert catalogue.decoder_status("vqgan-gumbel-f8-8192") == "cached"
