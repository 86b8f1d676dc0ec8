"""Benchmark TSVs in VLMEvalKit's format, for 05_eval.py: checked before any model loads (missing, empty,
not UTF-8, not tab-separated, a required column missing: one line each), read as the authors' scripts read
theirs (text) or as VLMEvalKit reads its own (pandas' defaults), images decoded (base64, multi-image JSON
lists, back-references to another row's image), and every row that cannot be scored skipped with its reason."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

from PIL import Image

import common


def decode_row_images(raw: str, stored: dict) -> list[Image.Image]:
    """A TSV `image` cell -> its images: one base64 string, a JSON list of them (multi-image rows, in
    VLMEvalKit's order), or a back-reference (<= 64 characters) to another row's cell. Raises ValueError
    with the reason."""
    parts = [raw]
    if raw.lstrip().startswith("["):
        try:
            parts = json.loads(raw)
        except ValueError:
            raise ValueError("image cell starts with '[' but is not a JSON list of base64 strings") from None
        if not parts or not all(isinstance(x, str) for x in parts):
            raise ValueError("image cell is an empty or non-string JSON list")
    images = []
    for k, part in enumerate(parts):
        data = part if len(part) > 64 else stored.get(part)
        if data is None or data.lstrip().startswith("["):
            raise ValueError(f"image {k + 1} refers to index {part!r}, which holds no single image")
        try:
            images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        except (ValueError, OSError) as e:
            raise ValueError(f"unreadable image {k + 1} of {len(parts)} ({type(e).__name__})") from None
    return images


REQUIRED_COLUMNS = ("index", "image", "question", "answer")


def check_bench_file(path: str) -> str | None:
    """Why a benchmark TSV cannot be read (None if it can): missing, empty, not UTF-8 text, not
    tab-separated, or missing a required column. Cheap: the header, then the bytes streamed once."""
    import codecs
    p = Path(path)
    if not p.is_file():
        return "no such file"
    if p.stat().st_size == 0:
        return "empty file"
    decoder, header = codecs.getincrementaldecoder("utf-8")(), ""
    with p.open("rb") as f:
        while chunk := f.read(1 << 24):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                return f"not UTF-8 text ({e.reason} at byte {f.tell() - len(chunk) + e.start})"
            if "\n" not in header:
                header += text[:1 << 16]
    first = header.split("\n", 1)[0].rstrip("\r")
    if "\t" not in first:
        return "not tab-separated (its first line has no tab)"
    missing = [c for c in REQUIRED_COLUMNS if c not in first.split("\t")]
    return f"missing column(s) {', '.join(missing)} (header: {first[:120]!r})" if missing else None


def check_benches(specs: list[str]) -> list[tuple[str, str]]:
    """--bench NAME=PATH ... -> [(name, path)], after checking every file: all problems are printed,
    one line each, and 05 stops before any model is loaded."""
    out, problems = [], []
    for spec in specs:
        if "=" not in spec:
            problems.append(f"--bench expects NAME=PATH, got {spec!r}")
            continue
        name, path = spec.split("=", 1)
        if (why := check_bench_file(path)) is not None:
            problems.append(f"{name}={path}: {why}")
        out.append((name, path))
    if problems:
        raise SystemExit("\n".join(f"[05] {x}" for x in problems))
    return out


def read_tsv(path: str, **kw):
    import pandas as pd
    try:
        return pd.read_csv(path, sep="\t", **kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"[05] {path}: cannot be read as a TSV ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def option_cells(path: str, df, letters: list[str], vlmevalkit: bool) -> list[list[str]]:
    """Each row's option cells A.. ('' = no option). The authors' scripts read their TSVs as text
    (keep_default_na=False); VLMEvalKit reads them with pandas' defaults, so there an option "None",
    "NA", "N/A", "null" or "nan" is missing and a numeric column with gaps reads as floats ("5.0")."""
    if not vlmevalkit or not letters:
        return [[r[c] for c in letters] for _, r in df.iterrows()]
    raw = read_tsv(path, usecols=letters)
    return [["" if v != v else str(v) for v in (r[c] for c in letters)] for _, r in raw.iterrows()]


def load_tsv(path: str, max_items: int = 0, vlmevalkit: bool = False) -> tuple[list[dict], dict]:
    """VLMEvalKit TSV -> (items {index, image, question, options, letters, answer, kind, meta}, {skipped
    index: reason}). `image` is one PIL image, or a list of them for multi-image rows (BLINK, MMMU). An
    `image` of at most 64 characters is a back-reference to the row with that index (VLMEvalKit stores
    a repeated image once). kind: 'mcq' (options), 'yes_no' (no options, a yes/no answer) or 'open'
    (no options: MMMU's open questions; with vlmevalkit, every row without options). Rows that cannot
    be scored (an empty question or answer, an answer letter that is not among the options) are skipped
    with their reason."""
    if (why := check_bench_file(path)) is not None:
        raise SystemExit(f"[05] {path}: {why}")
    df = read_tsv(path, dtype=str, keep_default_na=False)
    letters = [c for c in common.OPTION_LETTERS if c in df.columns]
    cells = option_cells(path, df, letters, vlmevalkit)
    stored = {r["index"]: r["image"] for _, r in df.iterrows() if len(r["image"]) > 64}
    items, skipped = [], {}
    for (_, r), row_options in zip(df.iterrows(), cells):
        present = [c for c, o in zip(letters, row_options) if o.strip()]
        answer = r["answer"].strip()
        if not r["question"].strip() or not answer:
            skipped[r["index"]] = "empty question" if not r["question"].strip() else "empty answer"
            continue
        if present and answer.upper() not in present:
            skipped[r["index"]] = f"answer {answer!r} is not among the options ({', '.join(present)})"
            continue
        cell = r["image"]
        raw = cell if len(cell) > 64 or cell.lstrip().startswith("[") else stored.get(cell)
        if raw is None:
            skipped[r["index"]] = f"image refers to index {cell!r}, which holds no image"
            continue
        try:
            images = decode_row_images(raw, stored)
        except ValueError as e:
            skipped[r["index"]] = str(e)
            continue
        refs = [int(k) for k in re.findall(r"<image (\d+)>", r["question"])]
        if refs and max(refs) > len(images):
            skipped[r["index"]] = f"question refers to <image {max(refs)}>, the row has {len(images)} image(s)"
            continue
        if not vlmevalkit and present != list(common.OPTION_LETTERS[:len(present)]):
            skipped[r["index"]] = f"options are not consecutive letters ({', '.join(present)})"
            continue
        options = [o for o in row_options if o.strip()]
        kind = "mcq" if options else "yes_no" if answer.lower() in ("yes", "no") and not vlmevalkit else "open"
        answer = answer.upper() if kind == "mcq" else answer.capitalize() if kind == "yes_no" else answer
        meta = {k: r[k] for k in df.columns if k not in ("image", "question", "answer", *letters)}
        items.append(dict(index=str(r["index"]), image=images[0] if len(images) == 1 else images,
                          question=r["question"], options=options, letters=present, answer=answer, kind=kind,
                          meta=meta))
        if max_items and len(items) >= max_items:
            break
    if skipped:
        print(f"[05] {path}: skipped {len(skipped)} rows: " + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5]))
    return items, skipped
