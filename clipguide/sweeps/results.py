"""A sweep's results in one place: ``results.csv`` (a row per point) and ``contact_sheet.png`` (the
final images laid out by two axes, labelled with their values), plus the zero-shot classification
of the final images when the spec asks for it."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from ..audit.classification import classify, write_csv
from ..records.files import save_png
from ..run.snapshots import ROW_BAND, fit_text

RESULTS = "results.csv"
SHEET = "contact_sheet.png"
CELL = 128  # the largest side of an image on the sheet
COLUMNS = ("index", "state", "file", "loss", "clip_similarity", "clip_score", "label", "label_probability", "error")


def write_results(out: Path, ledger: dict) -> None:
    """``results.csv``: per point its axis values, state, final image and figures."""
    axes = list(ledger["spec"]["axes"])
    rows = [{**{a: p["values"].get(a) for a in axes}, **{c: p.get(c) for c in COLUMNS}} for p in ledger["points"]]
    write_csv(rows, out / RESULTS)


def classify_points(out: Path, ledger: dict, classify_spec: dict, device: str) -> None:
    """Add each finished point's top label and its probability (the ``classify`` option of a spec)."""
    done = [p for p in ledger["points"] if p["state"] == "done" and p.get("file")]
    if not done:
        return
    result = classify([out / p["file"] for p in done], labels=classify_spec.get("labels", "imagenet"),
                      clip=classify_spec.get("clip", "shapes"), top_k=1, device=device)
    for p, top in zip(done, result.topk):
        p["label"], p["label_probability"] = top[0]


def sheet_axes(ledger: dict) -> tuple[list[str], str | None]:
    """(row axes, column axis): the spec's ``sheet`` or its first two axes; the other axes join the rows."""
    axes = list(ledger["spec"]["axes"])
    chosen = ledger["spec"].get("sheet") or axes[:2]
    column = chosen[1] if len(chosen) == 2 else None
    rows = [a for a in [chosen[0] if chosen else None, *axes] if a and a != column]
    return list(dict.fromkeys(rows)), column


def write_sheet(out: Path, ledger: dict) -> Path | None:
    """``contact_sheet.png``: one cell per finished point; rows and columns by :func:`sheet_axes`."""
    row_axes, column = sheet_axes(ledger)
    label = lambda p, names: " · ".join(f"{a} {p['values'][a]}" if a != "prompt" else str(p["values"][a]) for a in names)
    points = [p for p in ledger["points"] if p["state"] == "done" and p.get("file")]
    if not points:
        return None
    rows = list(dict.fromkeys(label(p, row_axes) for p in ledger["points"]))
    cols = list(dict.fromkeys(label(p, [column]) for p in ledger["points"])) if column else [""]
    side, band = CELL, 14
    sheet = Image.new("RGB", (side * len(cols), band + (band + side) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(cols):
        draw.text((c * side + 2, 1), fit_text(text, side - 4, draw), fill="black")
    for r, text in enumerate(rows):
        y = band + r * (band + side)
        draw.rectangle((0, y, sheet.width - 1, y + band - 1), fill=ROW_BAND)
        draw.text((2, y + 1), fit_text(text, sheet.width - 4, draw), fill="black")
    for p in points:
        r, c = rows.index(label(p, row_axes)), cols.index(label(p, [column])) if column else 0
        with Image.open(out / p["file"]) as im:
            im = ImageOps.contain(im.convert("RGB"), (side, side))
            sheet.paste(im, (c * side, band + r * (band + side) + band))
    record = {"sweep": {"spec": ledger["spec"], "rows": row_axes, "column": column}}
    save_png(out / SHEET, sheet, {"Description": "clipguide sweep contact sheet", "clipguide": record})
    return out / SHEET
