"""check_datasets / format_check_report on small data sets written by the tests."""

from __future__ import annotations

import hashlib

from moelab.data import check_datasets, format_check_report
from moelab.data.cifar import CLASSES as CIFAR_CLASSES


def _write_sums(folder, paths):
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}" for p in paths]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def test_check_rows_and_report(tmp_path, build):
    data = tmp_path / "data"
    build.write_idx_set(data / "mnist")
    entries, _ = build.image_folder_entries(CIFAR_CLASSES, n_train=1, n_test=1, size=(32, 32))
    build.make_tar(data / "cifar10-mini.tar.gz", entries)
    _write_sums(data, sorted((data / "mnist").iterdir()) + [data / "cifar10-mini.tar.gz"])
    rows = {r["name"]: r for r in check_datasets(data)}
    assert list(rows) == ["mnist", "fashion-mnist", "cifar10", "digits"]
    m = rows["mnist"]
    assert m["status"] == "OK" and (m["train"], m["test"], m["image_shape"]) == (20, 10, (28, 28, 1))
    # matches SHA256SUMS, but these fake files are not the canonical MNIST: reported, not an error
    assert m["checksum_ok"] is False and m["checksum_note"].startswith("differs from the canonical download")
    c = rows["cifar10"]
    assert c["status"] == "OK" and c["image_shape"] == (32, 32, 3) and c["checksum_ok"] is True
    assert c["checksum_note"] == f"matches {data / 'SHA256SUMS'} (1 file)" and c["train"] == 10
    assert c["cold_load_s"] >= 0 and c["cached_load_s"] >= 0 and len(c["checksum"]) == 64
    assert rows["fashion-mnist"]["status"] == "MISSING" and "fashion-mnist" in rows["fashion-mnist"]["message"]
    assert rows["digits"]["status"] == "OK" and rows["digits"]["train"] == 1437
    report = format_check_report(list(rows.values()))
    assert report.splitlines()[0].split()[:3] == ["data", "set", "status"]
    assert "mnist          OK" in report and "fashion-mnist  MISSING" in report and "32x32x3" in report
    assert "Data set 'fashion-mnist' not found" in report


def test_sha256sums_mismatch_is_an_error(tmp_path, build):
    data = tmp_path / "data"
    members, _ = build.cifar_members()
    archive = build.make_tar(data / "cifar-10-python.tar.gz", list(members.items()))
    (data / "SHA256SUMS").write_text(f"{'a' * 64}  cifar-10-python.tar.gz\n")
    (row,) = check_datasets(data, names=["cifar10"])
    assert row["status"].startswith("ERROR: checksum mismatch:") and str(archive) in row["status"]
    assert "ERROR" in format_check_report([row])


def test_check_reports_broken_data_as_error(tmp_path, build):
    data = tmp_path / "data"
    build.write_idx_set(data / "mnist")
    (data / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    (row,) = check_datasets(data, names=["mnist"])
    assert row["status"].startswith("ERROR: Cannot decompress")
