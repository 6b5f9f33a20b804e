"""Training logs: TensorBoard event files (no TensorFlow needed) and a JSON-lines copy.

Neither `tensorboard`, `tensorboardX` nor `clu` is a dependency of the project, so this module
writes the event-file format itself: TFRecord framing (length, masked CRC-32C, payload, masked
CRC-32C) around hand-encoded `Event` protocol buffers holding `Summary.Value.simple_value`
scalars. TensorBoard reads the files as usual (`tensorboard --logdir WORKDIR`). Every logged
row is also appended to `metrics.jsonl` for scripts.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import struct
import time
from typing import Mapping


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord framing uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    bits = n & 0x7F
    n >>= 7
    if n:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
  # Event: wall_time (1, double), step (2, int64), file_version (3, string), summary (5).
  msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    msg += _length_delimited(3, file_version.encode())
  if scalars:
    # Summary.value (1) -> Value: tag (1, string), simple_value (2, float).
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) +
                          _field(2, 5, struct.pack("<f", float(value))))
        for tag, value in scalars.items())
    msg += _length_delimited(5, values)
  return msg


def _record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", _masked_crc(header)) + data +
          struct.pack("<I", _masked_crc(data)))


class SummaryWriter:
  """Appends scalar summaries to a new TensorBoard event file and to `metrics.jsonl`."""

  def __init__(self, logdir: str | os.PathLike):
    self.logdir = pathlib.Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self._events = open(self.logdir / name, "ab")
    self._events.write(_record(_event(now, 0, file_version="brain.Event:2")))
    self._jsonl = open(self.logdir / "metrics.jsonl", "a")

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Logs `values` (tag -> number) at `step`."""
    values = {k: float(v) for k, v in values.items()}
    self._events.write(_record(_event(time.time(), int(step), scalars=values)))
    self._jsonl.write(json.dumps({"step": int(step), **values}, sort_keys=True) + "\n")

  def flush(self) -> None:
    self._events.flush()
    self._jsonl.flush()

  def close(self) -> None:
    self.flush()
    self._events.close()
    self._jsonl.close()


def read_scalars(path: str | os.PathLike) -> list[tuple[int, dict[str, float]]]:
  """Reads back (step, {tag: value}) rows of an event file written here (for tests)."""
  data = pathlib.Path(path).read_bytes()
  rows, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack_from("<Q", data, pos)
    if struct.unpack_from("<I", data, pos + 8)[0] != _masked_crc(data[pos:pos + 8]):
      raise ValueError(f"{path}: bad length checksum at byte {pos}")
    payload = data[pos + 12:pos + 12 + length]
    if struct.unpack_from("<I", data, pos + 12 + length)[0] != _masked_crc(payload):
      raise ValueError(f"{path}: bad data checksum at byte {pos}")
    pos += 16 + length
    rows.append(_parse_event(payload))
  return [r for r in rows if r[1]]


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return result, pos


def _fields(buf: bytes):
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    elif wire == 2:
      n, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    else:
      raise ValueError(f"unsupported wire type {wire}")
    yield number, value


def _parse_event(buf: bytes) -> tuple[int, dict[str, float]]:
  step, scalars = 0, {}
  for number, value in _fields(buf):
    if number == 2:
      step = value
    elif number == 5:
      for _, v in _fields(value):
        fields = dict(_fields(v))
        scalars[fields[1].decode()] = struct.unpack("<f", fields[2])[0]
  return step, scalars
