"""TensorBoard scalars without TensorFlow: event files written (and read back) by hand.

``tensorboard --logdir RUN_DIR/tensorboard`` shows one TensorBoard *run* per variant (``003-rationale-n8-s1``:
its loss, grad norm, learning rate and frozen flag, so the variants' curves overlay in one chart) and a
``study`` run with the segment's tokens/s. ``metrics.jsonl`` stays the record; the event files are rewritten
from it when a run resumes, so a resumed run shows each step once.

Format: TFRecord framing (``uint64`` length, masked CRC-32C of the length, payload, masked CRC-32C of the
payload) around ``tensorflow.Event`` protos (``wall_time`` = 1, ``step`` = 2, ``file_version`` = 3,
``summary`` = 5; ``Summary.value`` = 1; ``Summary.Value.tag`` = 1, ``simple_value`` = 2). The encoder is the few
lines of protobuf wire format those fields need; tests decode the files with the protobuf library.
"""
from __future__ import annotations

import pathlib
import re
import socket
import struct
import time
from typing import Iterable, Iterator, Optional


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1   # Castagnoli polynomial, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(step: int, wall_time: float, scalars: Optional[dict] = None,
                file_version: Optional[str] = None) -> bytes:
    """One serialized ``tensorflow.Event``: a file-version header or a summary of scalars."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(int(step))
    if file_version is not None:
        out += _len_field(3, file_version.encode())
    if scalars:
        values = b"".join(_len_field(1, _len_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", v))
                          for tag, v in scalars.items())
        out += _len_field(5, values)
    return out


def record(payload: bytes) -> bytes:
    n = struct.pack("<Q", len(payload))
    return n + struct.pack("<I", _masked(crc32c(n))) + payload + struct.pack("<I", _masked(crc32c(payload)))


def read_records(path) -> Iterator[bytes]:
    """The payloads of a TFRecord file; a bad checksum or a truncated record raises ``ValueError``."""
    data = pathlib.Path(path).read_bytes()
    i = 0
    while i < len(data):
        if i + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {i}")
        n, = struct.unpack_from("<Q", data, i)
        if struct.unpack_from("<I", data, i + 8)[0] != _masked(crc32c(data[i:i + 8])):
            raise ValueError(f"{path}: bad length checksum at byte {i}")
        j = i + 12 + n
        if j + 4 > len(data):
            raise ValueError(f"{path}: truncated record at byte {i}")
        payload = data[i + 12:j]
        if struct.unpack_from("<I", data, j)[0] != _masked(crc32c(payload)):
            raise ValueError(f"{path}: bad payload checksum at byte {i}")
        yield payload
        i = j + 4


class EventWriter:
    """Appends scalar events to ``events.out.tfevents.<time>.<host>`` in ``logdir``."""

    def __init__(self, logdir):
        self.dir = pathlib.Path(logdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = self.dir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.jaxpoison"
        self.path.write_bytes(record(event_bytes(0, now, file_version="brain.Event:2")))

    def add(self, rows: Iterable[tuple[int, dict]], wall_time: Optional[float] = None) -> None:
        """``rows``: (step, {tag: value}); non-finite values are skipped (a frozen variant's NaN loss)."""
        t = time.time() if wall_time is None else wall_time
        with self.path.open("ab") as f:
            for step, scalars in rows:
                kept = {k: float(v) for k, v in scalars.items() if v is not None and abs(float(v)) < float("inf")}
                if kept:
                    f.write(record(event_bytes(step, t, kept)))


def _run_name(entry: dict, k: int) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(entry.get("name", ""))).strip("-")
    return f"{k:03d}-{name}" if name else f"{k:03d}"


PER_VARIANT = ("loss", "grad_norm", "lr", "frozen")


class StudyLog:
    """One :class:`EventWriter` per variant plus one for the study, under ``RUN_DIR/tensorboard``."""

    def __init__(self, logdir, variant_table: list):
        root = pathlib.Path(logdir)
        for f in root.glob("*/events.out.tfevents.*"):   # rewritten from metrics.jsonl (the record) on resume
            f.unlink()
        self.variants = [EventWriter(root / _run_name(e, k)) for k, e in enumerate(variant_table)]
        self.study = EventWriter(root / "study")

    def add_rows(self, rows: list[dict]) -> None:
        """Rows as written to metrics.jsonl: ``{"step", "loss": [V], ..., "segment_tok_s"}``."""
        for k, w in enumerate(self.variants):
            w.add([(r["step"], {m: _num(r[m][k]) for m in PER_VARIANT if m in r}) for r in rows])
        self.study.add([(r["step"], {"tokens_per_s": r["segment_tok_s"]}) for r in rows if "segment_tok_s" in r])


def _num(v):
    return float(v) if v is not None else None
