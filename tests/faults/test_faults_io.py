"""tdabench._io: atomic writes, checksums, provenance, sidecars, safe paths, disk full, verify CLI."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
import torch

from tdabench import _io
from tdabench.errors import (
    DiskFullError,
    IntegrityError,
    ProvenanceError,
    UnsafeFileError,
    UnsafePathError,
)


def _flip(path, offset_from_end=20):
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


def _table():
    return pa.table(
        {"a": pa.array(np.arange(50), pa.int64()), "b": pa.array(np.linspace(0, 1, 50))}
    )


def test_parquet_round_trip_is_byte_reproducible_and_stamped(tmp_path):
    prov = {"benchmark": "b1", "spec_hash": "abc"}
    d1 = _io.write_parquet(tmp_path / "x.parquet", _table(), {"kind": "k"}, prov)
    d2 = _io.write_parquet(tmp_path / "y.parquet", _table(), {"kind": "k"}, prov)
    assert d1 == d2 == _io.table_digest(_table())
    assert (tmp_path / "x.parquet").read_bytes() == (tmp_path / "y.parquet").read_bytes()
    table, meta = _io.read_parquet(tmp_path / "x.parquet", {"benchmark": "b1"})
    assert table.equals(_table()) and meta["kind"] == "k" and "created" not in meta
    assert _io.verify_output(tmp_path / "x.parquet") == {str(tmp_path / "x.parquet"): prov}


def test_parquet_provenance_mismatch_names_file_and_values(tmp_path):
    _io.write_parquet(tmp_path / "x.parquet", _table(), provenance={"benchmark": "b1"})
    with pytest.raises(ProvenanceError, match=r"x\.parquet.*benchmark = 'b1', expected 'b2'"):
        _io.read_parquet(tmp_path / "x.parquet", {"benchmark": "b2"})


@pytest.mark.parametrize("damage", ["flip", "truncate", "unstamped"])
def test_parquet_damage_is_refused(tmp_path, damage):
    p = tmp_path / "x.parquet"
    _io.write_parquet(p, _table())
    if damage == "flip":
        # rewrite with different values but the old stamps: the checksum must catch it
        import pyarrow.parquet as pq

        t = pq.read_table(p)
        t2 = pa.table({"a": t["a"], "b": pa.array(np.linspace(0, 2, 50))}).replace_schema_metadata(
            t.schema.metadata
        )
        pq.write_table(t2, p)
        match = "fails its checksum"
    elif damage == "truncate":
        p.write_bytes(p.read_bytes()[:-30])
        match = "truncated or corrupted"
    else:
        import pyarrow.parquet as pq

        pq.write_table(_table(), p)
        match = "no tdabench.rows stamp"
    with pytest.raises(IntegrityError, match=match):
        _io.verify_output(p)


def test_safetensors_checksum_and_pickle_refusal(tmp_path):
    p = tmp_path / "m.safetensors"
    w = {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}
    _io.write_safetensors(p, w, {"epochs": 3}, {"benchmark": "b"})
    tensors, meta = _io.read_safetensors(p, {"benchmark": "b"})
    assert torch.equal(tensors["w"], w["w"]) and meta["epochs"] == "3"
    _flip(p, 10)  # inside the tensor data: only the checksum sees it
    with pytest.raises(IntegrityError, match=r"m\.safetensors.*fails its checksum"):
        _io.verify_output(p)
    p.write_bytes(b"\x80\x04\x95" + b"\0" * 40)  # a pickle
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        _io.verify_output(p)
    from safetensors.torch import save_file

    save_file(w, str(p))  # valid safetensors without a tdabench stamp
    with pytest.raises(IntegrityError, match="no tensors_sha256 stamp"):
        _io.verify_output(p)


def test_json_checksum_and_sidecar(tmp_path):
    p = tmp_path / "m.json"
    _io.write_json(p, {"value": 0.5, "provenance": {"benchmark": "b"}})
    _io.write_sidecar(p, {"seconds": 1.5})
    assert _io.read_json_checked(p, {"benchmark": "b"})["value"] == 0.5
    assert _io.read_sidecar(p)["seconds"] == 1.5 and "created" in _io.read_sidecar(p)
    # a directory verification skips the sidecar
    assert list(_io.verify_output(tmp_path)) == [str(p)]
    body = json.loads(p.read_text())
    body["value"] = 0.9
    p.write_text(json.dumps(body))
    with pytest.raises(IntegrityError, match=r"m\.json.*fails its checksum"):
        _io.verify_output(p)
    p.write_text("{garbage")
    with pytest.raises(IntegrityError, match="not readable JSON"):
        _io.verify_output(p)


def test_atomic_path_keeps_old_file_and_no_temporaries(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), _io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_disk_full_is_typed_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match=r"disk full at .*x\.json"):
        _io.write_json(tmp_path / "x.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_disk_full_for_real_with_a_file_size_limit(tmp_path):
    # RLIMIT_FSIZE makes write() fail with EFBIG, as a full disk would fail with ENOSPC
    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from tdabench import _io
        from tdabench.errors import DiskFullError
        try:
            _io.atomic_write_bytes({str(tmp_path / "big.bin")!r}, b"x" * 100000)
        except DiskFullError as exc:
            print("DISKFULL", exc)
            sys.exit(3)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert "disk full at" in out.stdout and "big.bin" in out.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "", "a\\..\\b", None])
def test_safe_join_refuses_escapes(tmp_path, name):
    with pytest.raises(UnsafePathError):
        _io.safe_join(tmp_path, name)


def test_safe_join_refuses_escaping_symlink(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    (tmp_path / "d" / "link").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(UnsafePathError, match="symlink"):
        _io.safe_join(tmp_path / "d", "link")
    assert _io.safe_join(tmp_path / "d", "sub/file") == tmp_path / "d" / "sub" / "file"


def test_mix_seed_values_are_frozen():
    from tdabench.groundtruth.subsets import derive_seed
    from tdabench.groundtruth.trainer import _mix

    # values of the two historical implementations, recorded before they were unified
    assert derive_seed("abc", "model", 3, 1) == 8972827336308235885
    assert derive_seed("k", "subset", 0) == 8148506235944005834
    assert _mix("stream", 5, 2) == 2298004437168345746
    assert _mix("dropout", 1, [1, 2, 3]) == 2980076376106026835


def test_verify_cli_exit_codes(tmp_path):
    p = tmp_path / "x.parquet"
    _io.write_parquet(p, _table(), provenance={"benchmark": "b1"})
    cmd = [sys.executable, "-m", "tdabench.pipeline", "verify", str(tmp_path)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "OK (1 file(s) verified)" in ok.stdout
    bad = subprocess.run(
        [*cmd, "--expect-key", "benchmark=b2"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "ProvenanceError" in bad.stderr and "'b2'" in bad.stderr
    p.write_bytes(p.read_bytes()[:-40])
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "IntegrityError" in bad.stderr and "x.parquet" in bad.stderr


def test_damaged_metadata_is_found_like_damaged_data(tmp_path):
    import pyarrow.parquet as pq

    p = tmp_path / "x.parquet"
    _io.write_parquet(p, _table(), {"config": json.dumps({"a": 1})}, {"benchmark": "b1"})
    meta = dict(pq.read_schema(p).metadata)
    meta[b"tdabench.config"] = b'{"a": 2}'  # the data checksum cannot see this
    pq.write_table(pq.read_table(p).replace_schema_metadata(meta), p)
    with pytest.raises(IntegrityError, match="fails its metadata checksum"):
        _io.verify_output(p)
