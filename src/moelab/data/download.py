"""Download data set files from a list of mirrors, verifying checksums.

Each file goes to a temp file beside its destination and is renamed only once its checksum
matched, so a failed or rejected download leaves nothing behind. ``MOELAB_MIRRORS``
(comma-separated base URLs, ``{name}`` is replaced by the data set name) overrides the
built-in mirrors, which is how tests download from ``file://`` folders.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moelab.errors import DataError
from moelab.io import atomic_path

MIRRORS_ENV = "MOELAB_MIRRORS"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    """A file to download. ``content_md5`` (MD5 of the gunzipped content) is accepted when a
    mirror serves the same data in a different gzip wrapper, so ``sha256`` does not match."""

    filename: str
    sha256: str | None = None
    content_md5: str | None = None


def mirrors_from_env() -> list[str] | None:
    value = os.environ.get(MIRRORS_ENV, "").strip()
    if not value:
        return None
    return [m.strip() for m in value.split(",") if m.strip()]


def file_url(base: str, filename: str, dataset: str = "") -> str:
    base = base.replace("{name}", dataset)
    if base.rstrip("/").endswith("/" + filename):
        return base.rstrip("/")
    return base.rstrip("/") + "/" + filename


def _fetch(url: str, dest: Path, timeout: float) -> str:
    """Stream ``url`` into ``dest``; return the SHA-256 of the bytes."""
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "moelab"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def content_md5(path: Path) -> str | None:
    """MD5 of a file's content, gunzipped when it is gzip (None when it cannot be read)."""
    for opener in (gzip.open, open):
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with opener(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            return digest.hexdigest()
        except gzip.BadGzipFile:
            continue  # not gzip: the file is its own content
        except (OSError, EOFError, zlib.error):
            return None
    return None


def _verify(remote: RemoteFile, path: Path, sha256: str, url: str) -> str | None:
    """None if the download is acceptable, else a sentence saying what did not match."""
    if remote.sha256 is None and remote.content_md5 is None:
        return None
    if remote.sha256 is not None and sha256 == remote.sha256:
        return None
    if remote.content_md5 is not None:
        md5 = content_md5(path)
        if md5 == remote.content_md5:
            log.info("%s: gzip wrapper differs from the canonical file but the content MD5 matches", url)
            return None
        expected = f"SHA-256 {remote.sha256} or uncompressed-content MD5 {remote.content_md5}" if remote.sha256 \
            else f"uncompressed-content MD5 {remote.content_md5}"
        return f"{url}: checksum mismatch: expected {expected}, got SHA-256 {sha256} (content MD5 {md5 or 'n/a: not gzip'})"
    return f"{url}: checksum mismatch: expected SHA-256 {remote.sha256}, got {sha256}"


def download_file(remote: RemoteFile, dest_dir: Path, mirrors: Sequence[str], *, dataset: str = "",
                  timeout: float = 30.0) -> Path:
    """Download ``remote`` into ``dest_dir`` from the first mirror that serves it with the right checksum."""
    if not mirrors:
        raise DataError(f"Cannot download {remote.filename}: no mirror URLs given.")
    dest = Path(dest_dir) / remote.filename
    failures: list[str] = []
    for base in mirrors:
        url = file_url(base, remote.filename, dataset)
        log.info("downloading %s", url)
        try:
            with atomic_path(dest) as tmp:
                sha256 = _fetch(url, tmp, timeout)
                problem = _verify(remote, tmp, sha256, url)
                if problem:
                    raise _Rejected(problem)
            return dest
        except _Rejected as e:
            failures.append(f"{e}; the download was discarded")
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            failures.append(f"{url}: {reason}")
    raise DownloadFailed(remote.filename, failures)


class _Rejected(Exception):
    pass


class DownloadFailed(DataError):
    """No mirror delivered a file with the right checksum; ``failures`` has one line per URL tried."""

    def __init__(self, filename: str, failures: list[str]):
        self.filename = filename
        self.failures = failures
        super().__init__(f"Could not download {filename}: " + "; ".join(failures) + ".")
