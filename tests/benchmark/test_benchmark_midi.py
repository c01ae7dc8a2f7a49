"""MIDI event tokenisation, the MAESTRO layout and the Bach-chorale stand-in."""

from __future__ import annotations

from pathlib import Path

import mido
import numpy as np
import pytest
import torch

from tdabench.benchmark import get_setting
from tdabench.benchmark.data import (
    VOCAB_SIZE,
    Note,
    describe_tokens,
    encode_midi,
    events_to_notes,
    load_maestro,
    read_midi_notes,
    write_midi,
)
from tdabench.errors import DataError


def test_exact_events_of_a_small_file(tmp_path: Path) -> None:
    notes = [
        Note(60, 80, 0.0, 0.5),  # bin 20
        Note(64, 80, 0.0, 0.5),
        Note(67, 100, 0.5, 2.25),  # bin 25, starts when the others end
    ]
    # unusual resolution and tempo, so tick -> second conversion matters
    p = write_midi(tmp_path / "a.mid", notes, ticks_per_beat=96, tempo=750_000)
    toks = encode_midi(p)
    assert describe_tokens(toks) == [
        "VELOCITY(20)",
        "NOTE_ON(60)",
        "NOTE_ON(64)",
        "TIME_SHIFT(50)",
        "NOTE_OFF(60)",
        "NOTE_OFF(64)",  # offs before ons at one instant
        "VELOCITY(25)",
        "NOTE_ON(67)",
        "TIME_SHIFT(100)",
        "TIME_SHIFT(75)",  # 1.75 s = 100 + 75 steps
        "NOTE_OFF(67)",
    ]
    assert toks.dtype == np.int64 and toks.tolist()[:3] == [356 + 20, 60, 64]
    assert toks.tolist()[3] == 256 + 49 and toks.tolist()[4] == 128 + 60


def test_round_trip_recovers_notes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    notes = []
    # distinct pitches: MIDI cannot tell overlapping notes of one pitch apart
    for pitch in rng.permutation(np.arange(21, 109))[:40]:
        s = float(rng.uniform(0, 8))
        notes.append(
            Note(int(pitch), int(rng.integers(1, 128)), s, s + float(rng.uniform(0.02, 3.0)))
        )
    p = write_midi(tmp_path / "r.mid", notes)
    back = events_to_notes(encode_midi(p, sustain=False))
    assert len(back) == len(notes)
    key = lambda n: (round(n.start, 2), n.pitch)  # noqa: E731
    for a, b in zip(sorted(notes, key=key), sorted(back, key=key), strict=True):
        assert a.pitch == b.pitch and a.velocity // 4 == b.velocity // 4
        assert abs(a.start - b.start) <= 0.0051 + 1e-3 and abs(a.end - b.end) <= 0.0051 + 1e-3


def test_sustain_pedal_extends_notes(tmp_path: Path) -> None:
    notes = [Note(60, 64, 0.0, 0.2), Note(62, 64, 0.5, 0.6), Note(60, 64, 0.8, 0.9)]
    p = write_midi(tmp_path / "s.mid", notes, pedal=[(0.1, 1.5)])
    held = {(n.pitch, round(n.start, 2)): round(n.end, 2) for n in read_midi_notes(p, sustain=True)}
    assert held[(60, 0.0)] == 0.8  # held by the pedal until the same pitch is struck again
    assert held[(62, 0.5)] == 1.5  # held until the pedal is lifted
    assert held[(60, 0.8)] == 1.5
    dry = {(n.pitch, round(n.start, 2)): round(n.end, 2) for n in read_midi_notes(p, sustain=False)}
    assert dry[(62, 0.5)] == 0.6


def test_tempo_changes_and_drums(tmp_path: Path) -> None:
    mid = mido.MidiFile(type=1, ticks_per_beat=100)
    tr = mido.MidiTrack()
    tr += [
        mido.MetaMessage("set_tempo", tempo=1_000_000, time=0),
        mido.Message("note_on", note=60, velocity=64, time=0),
        mido.Message("note_off", note=60, velocity=0, time=100),  # 1 beat at 1 s/beat
        mido.MetaMessage("set_tempo", tempo=250_000, time=0),
        mido.Message("note_on", note=62, velocity=64, time=100),  # +0.25 s
        mido.Message("note_on", note=62, velocity=0, time=200),  # note_on vel 0 = off, +0.5 s
        mido.Message("note_on", channel=9, note=36, velocity=90, time=0),  # drums are ignored
        mido.Message("note_off", channel=9, note=36, velocity=0, time=10),
    ]
    mid.tracks.append(tr)
    mid.save(tmp_path / "t.mid")
    got = [
        (n.pitch, round(n.start, 3), round(n.end, 3)) for n in read_midi_notes(tmp_path / "t.mid")
    ]
    assert got == [(60, 0.0, 1.0), (62, 1.25, 1.75)]


def test_bad_midi_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "x.mid").write_bytes(b"MThd garbage")
    with pytest.raises(DataError, match="cannot parse MIDI"):
        encode_midi(tmp_path / "x.mid")
    with pytest.raises(DataError, match="not found"):
        encode_midi(tmp_path / "nope.mid")


def test_maestro_layout(maestro_root: Path) -> None:
    d = load_maestro(maestro_root, n_train=6, n_test=5, seq_len=16, test_windows_per_piece=1)
    assert d.train[0].shape == (6, 16) and d.train[0].dtype == torch.int64
    assert d.n_test == 1  # one test piece, one window from its start
    assert torch.equal(d.train[1][:, :-1], d.train[0][:, 1:])
    first = encode_midi(maestro_root / "2018/piece_0.midi")
    assert (
        d.train[0][0].tolist() == first[:16].tolist()
        and d.train[1][0].tolist() == first[1:17].tolist()
    )
    test_piece = encode_midi(maestro_root / "2018/piece_3.midi")
    assert d.test[0][0].tolist() == test_piece[:16].tolist()
    assert (
        d.meta["split"]["test_pieces"] == ["2018/piece_3.midi"] and d.meta["n_test_requested"] == 5
    )
    assert "2018/piece_2.midi" not in d.meta["midi_sha256"]  # validation piece never read
    assert int(d.train[0].max()) < VOCAB_SIZE
    s = get_setting("maestro_musictransformer_tiny", n_train=8, n_test=4, seq_len=16)
    d2 = s.load(data_root=maestro_root)
    assert d2.n_test == 4 and d2.meta["source"] == "maestro-midi"  # all windows of the test piece
    out = s.build_model().eval()(d2.train[0][:2])
    assert out.shape == (2, 16, VOCAB_SIZE)
    with pytest.raises(DataError, match="training sequences"):
        load_maestro(maestro_root, n_train=10_000, n_test=1, seq_len=16)


def test_maestro_missing_names_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="maestro-v") as err:
        get_setting("maestro_musictransformer").load(data_root=tmp_path)
    assert str(tmp_path) in str(err.value) and "data_root" in str(err.value)
    with pytest.raises(DataError, match="_tiny") as err:
        get_setting("maestro_musictransformer").load()
    assert "data_root" in str(err.value)


def test_bach_chorale_standin() -> None:
    pytest.importorskip("music21")
    d = get_setting("maestro_musictransformer_tiny", n_train=16, n_test=4).load()
    assert d.train[0].shape == (16, 32) and d.n_test == 4
    assert d.meta["source"] == "music21-bach-chorales"
    assert not set(d.meta["split"]["train_pieces"]) & set(d.meta["split"]["test_pieces"])
    names = describe_tokens(d.train[0][0])
    assert any(n.startswith("NOTE_ON") for n in names) and any(
        n.startswith("TIME_SHIFT") for n in names
    )
