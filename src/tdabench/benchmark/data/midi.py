"""Performance-event tokenisation of MIDI, as in Music Transformer (Huang et al., 2018).

Vocabulary (388 tokens):

============  ==========  =====================================================
token ids     event       meaning
============  ==========  =====================================================
0 .. 127      NOTE_ON     start pitch ``p`` at the current velocity
128 .. 255    NOTE_OFF    release pitch ``p``
256 .. 355    TIME_SHIFT  advance time by ``k`` 10 ms steps, ``k = id - 255`` (10 ms .. 1 s)
356 .. 387    VELOCITY    set the velocity bin ``b = id - 356`` (MIDI velocity ``// 4``)
============  ==========  =====================================================

Times are quantised to a 10 ms grid (absolute times rounded, so errors do not accumulate);
longer gaps are several TIME_SHIFTs. At one instant NOTE_OFFs come before NOTE_ONs, and
pitches ascend. With ``sustain=True`` (the Music Transformer / MAESTRO preprocessing) a note
released while the sustain pedal (CC 64 >= 64) is down keeps sounding until the pedal is
lifted or the same pitch is struck again. Drum-channel (10) notes are ignored.

MIDI files are parsed with ``mido``; tempo changes are honoured.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tdabench._io import atomic_path
from tdabench.benchmark.data.common import import_optional
from tdabench.errors import DataError

__all__ = [
    "NOTE_OFF_OFFSET",
    "NOTE_ON_OFFSET",
    "TIME_SHIFT_OFFSET",
    "VELOCITY_OFFSET",
    "VOCAB_SIZE",
    "Note",
    "describe_tokens",
    "encode_midi",
    "events_to_notes",
    "notes_to_events",
    "read_midi_notes",
    "write_midi",
]

NOTE_ON_OFFSET = 0
NOTE_OFF_OFFSET = 128
TIME_SHIFT_OFFSET = 256
VELOCITY_OFFSET = 356
VOCAB_SIZE = 388
STEPS_PER_SECOND = 100
MAX_SHIFT = 100
VELOCITY_BINS = 32
_DRUM_CHANNEL = 9


@dataclass(frozen=True)
class Note:
    """One note: MIDI ``pitch`` and ``velocity``, ``start`` and ``end`` in seconds."""

    pitch: int
    velocity: int
    start: float
    end: float


def _mido():
    return import_optional("mido", "MIDI parsing needs PyPI mido: pip install 'tdabench[data]'")


def _midi_messages(source: str | os.PathLike | bytes) -> list:
    """The messages of a MIDI file (path or bytes), tracks merged, ``msg.time`` in seconds."""
    mido = _mido()
    try:
        if isinstance(source, (bytes, bytearray)):
            mid = mido.MidiFile(file=io.BytesIO(bytes(source)))
            name = "<bytes>"
        else:
            name = str(source)
            if not Path(source).is_file():
                raise DataError(
                    f"MIDI file {name!r} not found; check data_root and the csv's midi_filename column"
                )
            mid = mido.MidiFile(str(source))
        return list(mid)  # merged tracks, msg.time = seconds since the previous message
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"cannot parse MIDI {name!r} ({type(exc).__name__}: {exc}); is it a valid .mid file?"
        ) from exc


class _NoteTracker:
    """Pairs note-ons with note-offs; with ``sustain``, holds released notes while the pedal is down."""

    def __init__(self, sustain: bool) -> None:
        self.sustain = sustain
        self.notes: list[Note] = []
        self.open: dict[tuple[int, int], deque[tuple[float, int]]] = defaultdict(deque)
        self.held: dict[int, list[tuple[int, float, int]]] = defaultdict(
            list
        )  # (pitch, start, vel)
        self.pedal: dict[int, bool] = defaultdict(bool)

    def release_held(self, ch: int, t: float, pitch: int | None = None) -> None:
        keep = []
        for p, s, v in self.held[ch]:
            if pitch is None or p == pitch:
                self.notes.append(Note(p, v, s, t))
            else:
                keep.append((p, s, v))
        self.held[ch] = keep

    def note(self, msg: Any, now: float) -> None:
        ch, pitch = msg.channel, msg.note
        if ch == _DRUM_CHANNEL:
            return
        if msg.type == "note_on" and msg.velocity > 0:
            if self.sustain:
                self.release_held(ch, now, pitch)
            self.open[(ch, pitch)].append((now, msg.velocity))
        elif self.open[(ch, pitch)]:
            start, vel = self.open[(ch, pitch)].popleft()
            if self.sustain and self.pedal[ch]:
                self.held[ch].append((pitch, start, vel))
            else:
                self.notes.append(Note(pitch, vel, start, now))

    def pedal_change(self, msg: Any, now: float) -> None:
        down = msg.value >= 64
        if self.pedal[msg.channel] and not down:
            self.release_held(msg.channel, now)
        self.pedal[msg.channel] = down

    def finish(self, now: float) -> list[Note]:
        for (_, pitch), q in self.open.items():
            for start, vel in q:
                self.notes.append(Note(pitch, vel, start, now))
        for ch in list(self.held):
            self.release_held(ch, now)
        self.notes.sort(key=lambda n: (n.start, n.pitch, n.end))
        return self.notes


def read_midi_notes(source: str | os.PathLike | bytes, sustain: bool = True) -> list[Note]:
    """Parse a MIDI file (path or bytes) into notes sorted by (start, pitch).

    Args:
        source: a ``.mid`` path or the file's bytes.
        sustain: extend notes held by the sustain pedal (see the module docstring).

    Returns:
        The notes (:class:`Note`: pitch, velocity, start and end in seconds), sorted by
        ``(start, pitch, end)``.

    Raises:
        DataError: the file is missing or not a readable MIDI file.
    """
    tracker = _NoteTracker(sustain)
    now = 0.0
    for msg in _midi_messages(source):
        now += float(msg.time)
        if msg.type in ("note_on", "note_off"):
            tracker.note(msg, now)
        elif msg.type == "control_change" and msg.control == 64 and sustain:
            tracker.pedal_change(msg, now)
    return tracker.finish(now)


def notes_to_events(notes: list[Note]) -> np.ndarray:
    """Token ids ``(L,)`` int64 of a list of notes (see the module docstring)."""
    events: list[tuple[int, int, int, int]] = []  # (step, order, pitch, velocity)
    for n in notes:
        if not 0 <= n.pitch < 128:
            raise DataError(f"note pitch {n.pitch} outside 0..127")
        s = round(n.start * STEPS_PER_SECOND)
        e = max(round(n.end * STEPS_PER_SECOND), s + 1)
        events.append((s, 1, n.pitch, n.velocity))
        events.append((e, 0, n.pitch, 0))
    events.sort()
    out: list[int] = []
    now = 0
    vel_bin = -1
    for step, order, pitch, velocity in events:
        gap = step - now
        while gap > 0:
            k = min(gap, MAX_SHIFT)
            out.append(TIME_SHIFT_OFFSET + k - 1)
            gap -= k
        now = step
        if order == 0:
            out.append(NOTE_OFF_OFFSET + pitch)
        else:
            b = min(max(int(velocity), 0), 127) * VELOCITY_BINS // 128
            if b != vel_bin:
                out.append(VELOCITY_OFFSET + b)
                vel_bin = b
            out.append(NOTE_ON_OFFSET + pitch)
    return np.asarray(out, dtype=np.int64)


def events_to_notes(tokens: np.ndarray | list[int]) -> list[Note]:
    """Decode token ids back to notes (velocity = bin * 4; unmatched NOTE_OFFs are ignored,
    notes still open at the end close at the last time). Sorted by (start, pitch)."""
    now = 0
    velocity = 64
    open_notes: dict[int, deque[tuple[int, int]]] = defaultdict(deque)
    notes: list[Note] = []
    for tok in np.asarray(tokens, dtype=np.int64).reshape(-1):
        t = int(tok)
        if not 0 <= t < VOCAB_SIZE:
            raise DataError(f"token {t} outside the vocabulary 0..{VOCAB_SIZE - 1}")
        if t < NOTE_OFF_OFFSET:
            open_notes[t].append((now, velocity))
        elif t < TIME_SHIFT_OFFSET:
            p = t - NOTE_OFF_OFFSET
            if open_notes[p]:
                s, v = open_notes[p].popleft()
                notes.append(Note(p, v, s / STEPS_PER_SECOND, now / STEPS_PER_SECOND))
        elif t < VELOCITY_OFFSET:
            now += t - TIME_SHIFT_OFFSET + 1
        else:
            velocity = (t - VELOCITY_OFFSET) * (128 // VELOCITY_BINS)
    for p, q in open_notes.items():
        for s, v in q:
            notes.append(Note(p, v, s / STEPS_PER_SECOND, now / STEPS_PER_SECOND))
    notes.sort(key=lambda n: (n.start, n.pitch, n.end))
    return notes


def describe_tokens(tokens: np.ndarray | list[int]) -> list[str]:
    """Readable names, e.g. ``["VELOCITY(22)", "NOTE_ON(60)", "TIME_SHIFT(50)", "NOTE_OFF(60)"]``
    (TIME_SHIFT counts 10 ms steps)."""
    names = []
    for tok in np.asarray(tokens, dtype=np.int64).reshape(-1):
        t = int(tok)
        if t < NOTE_OFF_OFFSET:
            names.append(f"NOTE_ON({t})")
        elif t < TIME_SHIFT_OFFSET:
            names.append(f"NOTE_OFF({t - NOTE_OFF_OFFSET})")
        elif t < VELOCITY_OFFSET:
            names.append(f"TIME_SHIFT({t - TIME_SHIFT_OFFSET + 1})")
        else:
            names.append(f"VELOCITY({t - VELOCITY_OFFSET})")
    return names


def encode_midi(source: str | os.PathLike | bytes, sustain: bool = True) -> np.ndarray:
    """Token ids ``(L,)`` int64 of a MIDI file (path or bytes)."""
    return notes_to_events(read_midi_notes(source, sustain=sustain))


def write_midi(
    path: str | os.PathLike,
    notes: list[Note],
    ticks_per_beat: int = 480,
    tempo: int = 500_000,
    pedal: list[tuple[float, float]] | None = None,
) -> Path:
    """Write ``notes`` (and sustain-pedal ``(down, up)`` intervals in seconds) as a type-0 MIDI file.

    Times are converted to ticks at the given tempo (microseconds per beat). The file is
    written to a temporary name and moved into place.
    """
    mido = _mido()
    per_sec = ticks_per_beat * 1_000_000 / tempo
    timed: list[tuple[int, int, object]] = []
    for n in notes:
        timed.append(
            (
                round(n.start * per_sec),
                2,
                mido.Message("note_on", note=n.pitch, velocity=n.velocity),
            )
        )
        timed.append(
            (round(n.end * per_sec), 1, mido.Message("note_off", note=n.pitch, velocity=0))
        )
    for down, up in pedal or []:
        timed.append(
            (round(down * per_sec), 0, mido.Message("control_change", control=64, value=127))
        )
        timed.append((round(up * per_sec), 0, mido.Message("control_change", control=64, value=0)))
    timed.sort(key=lambda x: (x[0], x[1]))
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=tempo, time=0))
    last = 0
    for tick, _, msg in timed:
        track.append(msg.copy(time=tick - last))
        last = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    mid = mido.MidiFile(type=0, ticks_per_beat=ticks_per_beat)
    mid.tracks.append(track)
    p = Path(path)
    with atomic_path(p) as tmp:
        mid.save(str(tmp))
    return p
