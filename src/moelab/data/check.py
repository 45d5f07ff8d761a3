"""``moelab data check``: which data sets are present, intact, and how fast they load."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from moelab.data.cache import file_sha256
from moelab.data.idx import read_maybe_gzip
from moelab.data.location import resolve_data_dir
from moelab.data.registry import (
    DATASET_NAMES,
    SPECS,
    Source,
    canonical_name,
    load_dataset,
    load_source,
    locate,
    missing_message,
)
from moelab.errors import DataError

_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(.+?)\s*$")


def _listed_sha256(path: Path, root: Path) -> tuple[str, Path] | None:
    """(expected SHA-256, SHA256SUMS file) from a SHA256SUMS beside ``path`` or in a parent up to ``root``."""
    path = path.absolute()
    folders = [path.parent, *path.parent.parents]
    for folder in folders:
        sums = folder / "SHA256SUMS"
        if sums.is_file():
            try:
                lines = sums.read_text().splitlines()
            except (OSError, UnicodeDecodeError):
                lines = []
            for line in lines:
                m = _SUMS_LINE.match(line)
                if m and (folder / m.group(2)).absolute() == path:
                    return m.group(1).lower(), sums
        if folder == root or root not in folder.parents:
            break
    return None


def verify_source(name: str, source: Source, data_dir: Path) -> tuple[bool | None, str]:
    """(all checks passed / some failed / nothing to check against, a short note).

    A file is checked against a ``SHA256SUMS`` listing it (beside it or in a parent folder up to
    the data dir) and against the canonical download's SHA-256 or, for MNIST, the MD5 of the
    uncompressed content (the only check that survives re-compression).
    """
    canonical = {f.filename: f for f in SPECS[name].files} if name in SPECS else {}
    passed: dict[str, int] = {}
    failed: list[str] = []
    listed_ok = True
    for path in source.paths:
        if path.is_dir():
            continue
        actual = file_sha256(path)
        listed = _listed_sha256(path, data_dir)
        if listed is not None:
            if actual == listed[0]:
                passed[f"matches {listed[1]}"] = passed.get(f"matches {listed[1]}", 0) + 1
            else:
                listed_ok = False
                failed.append(f"{path}: SHA-256 {actual} but {listed[1]} lists {listed[0]}")
        remote = canonical.get(path.name) or canonical.get(path.name + ".gz")
        if remote is None:
            continue
        if remote.sha256 and actual == remote.sha256:
            passed["canonical SHA-256"] = passed.get("canonical SHA-256", 0) + 1
        elif remote.content_md5:
            try:
                md5 = hashlib.md5(read_maybe_gzip(path), usedforsecurity=False).hexdigest()
            except DataError:
                md5 = "unreadable"
            if md5 == remote.content_md5:
                passed["canonical content MD5"] = passed.get("canonical content MD5", 0) + 1
            else:
                failed.append(f"{path.name}: content MD5 {md5}, canonical is {remote.content_md5}")
        elif path.name == remote.filename:
            failed.append(f"{path.name}: SHA-256 {actual} differs from the canonical {remote.sha256}")
    if failed:
        note = "; ".join(failed)
        return False, note if not listed_ok else f"differs from the canonical download ({note})"
    if passed:
        return True, "; ".join(f"{what} ({n} file{'s' if n > 1 else ''})" for what, n in passed.items())
    return None, "no reference checksum"


def _row(name: str) -> dict:
    return {"name": name, "status": "MISSING", "train": None, "test": None, "image_shape": None, "classes": None,
            "checksum": None, "checksum_ok": None, "checksum_note": "", "cold_load_s": None,
            "cached_load_s": None, "source": None, "message": ""}


def _best_of(n: int, load) -> tuple:
    """(result, fastest of ``n`` timings): one slow run on a busy machine says little about the cache."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        result = load()
        best = min(best, time.perf_counter() - t0)
    return result, best


def check_datasets(data_dir: str | os.PathLike | None = None, names: Sequence[str] | None = None) -> list[dict]:
    """One row per data set in ``DATASET_NAMES``: status "OK" / "MISSING" / "ERROR: ...", counts, image
    shape (H, W, C), checksum key and verification, cold (decode from source, rebuilding the cache)
    and cached (best of two loads from the cache) load times in seconds. ``names`` limits the check to some data sets. Never downloads."""
    root = resolve_data_dir(data_dir)
    rows = []
    for name in [canonical_name(n) for n in names] if names is not None else DATASET_NAMES:
        row = _row(name)
        try:
            if name == "digits":
                t0 = time.perf_counter()
                load_dataset(name)
                t1 = time.perf_counter()
                ds = load_dataset(name)
                t2 = time.perf_counter()
                ok, note = None, "bundled with scikit-learn"
            else:
                source, dirs, notes = locate(name, root)
                if source is None:
                    row["message"] = missing_message(SPECS[name], root, dirs, notes, "")
                    rows.append(row)
                    continue
                row["source"] = source.describe()
                t0 = time.perf_counter()
                load_source(name, source, refresh=True)
                t1 = time.perf_counter()
                ds, cached_s = _best_of(2, functools.partial(load_source, name, source))
                t2 = t1 + cached_s
                ok, note = verify_source(name, source, root)
            row.update(
                status="OK", train=len(ds.train_x), test=len(ds.test_x), image_shape=ds.image_shape,
                classes=len(ds.classes), checksum=ds.checksum, checksum_ok=ok, checksum_note=note,
                cold_load_s=round(t1 - t0, 3), cached_load_s=round(t2 - t1, 3), source=ds.source,
            )
            if ok is False and not note.startswith("differs from the canonical"):
                row["status"] = f"ERROR: checksum mismatch: {note}"
        except DataError as e:
            row["status"] = f"ERROR: {e}"
        rows.append(row)
    return rows


def check_verdict(rows: list[dict], data_dir: str | os.PathLike | None = None) -> tuple[bool, str]:
    """(every data set OK, the last line of ``moelab data check``): which are missing or invalid and what to do."""
    missing = [r["name"] for r in rows if r["status"] == "MISSING"]
    invalid = [r["name"] for r in rows if r["status"] != "OK" and r["name"] not in missing]
    if not missing and not invalid:
        return True, f"all {len(rows)} data sets OK"
    root = resolve_data_dir(data_dir)
    parts = []
    if missing:
        where = f"its files into {root / missing[0]}/" if len(missing) == 1 else f"each one's files into {root}/NAME/"
        parts.append(f"{_count(missing)} missing: {', '.join(missing)} (put {where}; which files is said above "
                     f"and in the README)")
    if invalid:
        parts.append(f"{_count(invalid)} invalid: {', '.join(invalid)} (fix or replace the files named above)")
    return False, "moelab data check: " + "; ".join(parts) + "."


def _count(names: list[str]) -> str:
    return f"{len(names)} data set{'s' if len(names) > 1 else ''}"


def format_check_report(rows: list[dict]) -> str:
    """A table of :func:`check_datasets` rows, then one paragraph per data set with its details."""
    def cell(v, fmt="{}"):
        return "-" if v is None else fmt.format(v)

    header = ("data set", "status", "train", "test", "image (HxWxC)", "classes", "checksum", "cold load", "cached load")
    table = [header]
    for r in rows:
        ok = {True: "ok", False: "MISMATCH", None: "n/a"}[r["checksum_ok"]] if r["status"] != "MISSING" else "-"
        shape = "x".join(map(str, r["image_shape"])) if r["image_shape"] else None
        status = r["status"] if not r["status"].startswith("ERROR") else "ERROR"
        table.append((r["name"], status, cell(r["train"]), cell(r["test"]), cell(shape), cell(r["classes"]), ok,
                      cell(r["cold_load_s"], "{:.2f} s"), cell(r["cached_load_s"], "{:.2f} s")))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {2, 3, 5, 7, 8}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for r in rows:
        if r["status"] == "MISSING":
            detail = r["message"]
        elif r["status"].startswith("ERROR"):
            detail = r["status"]
        else:
            detail = f"{r['source']}; SHA-256 key {r['checksum'][:16]}...; checksums: {r['checksum_note']}"
        lines.append(textwrap.fill(f"{r['name']}: {detail}", width=110, subsequent_indent="    ",
                                   break_on_hyphens=False, break_long_words=False))
    return "\n".join(lines)
