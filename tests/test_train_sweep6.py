"""The launcher's token files at their edges: a ``.bin`` file that is not uint16 ids (an odd
number of bytes, or none) and a ``.npy`` of uint64 ids past int64's range are refused naming the
file and what it holds, before any rank starts."""

from __future__ import annotations

import numpy as np
import pytest

from moesys_compile import train


def run_launcher(tmp_path, data: str, capsys, monkeypatch) -> str:
    """``moesys-compile train --nproc-per-node 2 --data DATA``: its exit code must be 2 and no rank
    started; returns stderr."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(train, "launch", lambda *a, **k: pytest.fail("ranks were launched"))
    argv = ["--model", "tiny-moe", "--override", "vocab_size=256", "--steps", "1", "--nproc-per-node", "2",
            "--data", str(tmp_path / data), "--batch-size", "2", "--seq-len", "8"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("size", [3, 0])
def test_a_bin_file_that_is_not_uint16_ids_is_named(tmp_path, size, capsys, monkeypatch):
    (tmp_path / "ids.bin").write_bytes(bytes(range(size)))
    err = run_launcher(tmp_path, "ids.bin", capsys, monkeypatch)
    says = "is 3 bytes, an odd number, so not uint16 token ids" if size else "holds no token ids"
    assert f"--data '{tmp_path / 'ids.bin'}' {says}" in err


def test_uint64_ids_past_int64_are_read_as_they_are_not_as_negative(tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "ids.npy", np.full(40, 2 ** 63, dtype=np.uint64))
    err = run_launcher(tmp_path, "ids.npy", capsys, monkeypatch)
    assert f"has token id {2 ** 63} >= the model's vocab_size (256)" in err


def test_an_even_bin_file_is_its_uint16_ids_in_order(tmp_path):
    np.arange(300, dtype=np.uint16).tofile(tmp_path / "ids.bin")
    source = train.TokenSource(str(tmp_path / "ids.bin"), 512, batch=2, seq=8, seed=0)
    assert source.tokens.tolist() == list(range(300))
