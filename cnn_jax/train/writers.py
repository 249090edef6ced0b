"""What a run leaves behind to read: metric logs and a progress bar.

MetricWriter writes every logged step twice, with no dependency beyond NumPy:

  * `workdir/metrics.jsonl`: one JSON object a line, {"step", "time", name: value};
    the file plots and tables read (read_jsonl).
  * `workdir/tensorboard/events.out.tfevents.<time>.<host>`: TensorBoard scalar
    summaries, encoded by hand. An event file is a sequence of TFRecords,

        uint64 length | uint32 masked_crc(length) | data[length] | uint32 masked_crc(data)

    (little-endian; crc = CRC-32C, Castagnoli polynomial; masked_crc =
    ((crc >> 15) | (crc << 17)) + 0xa282ead8 mod 2^32), each holding a serialized
    `Event` protocol buffer:

        Event   { double wall_time = 1; int64 step = 2;
                  oneof what { string file_version = 3; Summary summary = 5; } }
        Summary { repeated Value value = 1; }
        Value   { string tag = 1; float simple_value = 2; }

    The first record carries file_version "brain.Event:2". read_tfevents reads
    such files back, checking both CRCs of every record.

Resuming from checkpoint step k with `resume_step=k` first drops what the
interrupted run logged after step k (and a line or record torn by a crash)
from both logs, so the resumed run's logs hold the same steps as an
uninterrupted run's. Only the chief process should write: pass
`enabled=jax.process_index() == 0`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import struct
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

JSONL_NAME = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
FILE_VERSION = 'brain.Event:2'

# ---------------------------------------------------------------------------
# CRC-32C (Castagnoli), table-driven. Event records are tens of bytes, so a
# pure-Python byte loop costs microseconds per logged step.

_CASTAGNOLI_REFLECTED = 0x82F63B78
_CRC_MASK_DELTA = 0xA282EAD8


def _crc_table() -> Tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (_CASTAGNOLI_REFLECTED if crc & 1 else 0)
    table.append(crc)
  return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (reflected, init and final xor 0xFFFFFFFF)."""
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC-32C rotated right by 15 bits plus a constant.

  The mask keeps a CRC computed over data that itself contains CRCs from
  being degenerate."""
  crc = crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def encode_record(data: bytes) -> bytes:
  """One TFRecord framing `data`."""
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', masked_crc32c(header)) + data
          + struct.pack('<I', masked_crc32c(data)))


def _iter_records(blob: bytes, *, where: str = '', allow_torn_tail: bool = False
                  ) -> Iterator[Tuple[int, bytes]]:
  """(offset, payload) of each record in `blob`, both CRCs checked.

  A record cut short at the end of the data (a crash mid-write) ends the
  iteration when allow_torn_tail, else raises; a CRC mismatch always raises."""
  pos, size = 0, len(blob)
  while pos < size:
    if size - pos < 12:
      if allow_torn_tail:
        return
      raise ValueError(f'{where}truncated record header at byte {pos}.')
    header = blob[pos:pos + 8]
    (length,) = struct.unpack('<Q', header)
    (length_crc,) = struct.unpack('<I', blob[pos + 8:pos + 12])
    if masked_crc32c(header) != length_crc:
      raise ValueError(f'{where}CRC mismatch in the length of the record at byte {pos}; '
                       'the file is corrupt.')
    end = pos + 12 + length + 4
    if end > size:
      if allow_torn_tail:
        return
      raise ValueError(f'{where}truncated record at byte {pos} '
                       f'({length} data bytes announced, {size - pos - 16} present).')
    data = blob[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack('<I', blob[end - 4:end])
    if masked_crc32c(data) != data_crc:
      raise ValueError(f'{where}CRC mismatch in the data of the record at byte {pos}; '
                       'the file is corrupt.')
    yield pos, data
    pos = end


# ---------------------------------------------------------------------------
# The few protocol-buffer wire types an Event needs.

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1          # negative int64 -> two's complement, 10 bytes
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    if n:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _len_delimited(field: int, payload: bytes) -> bytes:
  return _key(field, _LEN) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, file_version: Optional[str] = None,
                 scalars: Optional[Mapping[str, float]] = None) -> bytes:
  """A serialized Event: a file_version header or a Summary of simple_value scalars."""
  out = _key(1, _FIXED64) + struct.pack('<d', wall_time) + _key(2, _VARINT) + _varint(step)
  if file_version is not None:
    out += _len_delimited(3, file_version.encode('utf-8'))
  if scalars:
    values = b''.join(
        _len_delimited(1, _len_delimited(1, tag.encode('utf-8'))
                       + _key(2, _FIXED32) + struct.pack('<f', value))
        for tag, value in scalars.items())
    out += _len_delimited(5, values)
  return out


def _read_varint(buf: bytes, pos: int) -> Tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf) or shift > 63:
      raise ValueError('malformed varint in event proto.')
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return result, pos


def _fields(buf: bytes) -> Iterator[Tuple[int, int, Any]]:
  """(field number, wire type, value) of each field of a serialized message."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    field, wire_type = key >> 3, key & 7
    if wire_type == _VARINT:
      value, pos = _read_varint(buf, pos)
    elif wire_type == _FIXED64:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire_type == _LEN:
      n, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    elif wire_type == _FIXED32:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f'unsupported protobuf wire type {wire_type} (field {field}).')
    if pos > len(buf):
      raise ValueError('truncated field in event proto.')
    yield field, wire_type, value


def decode_event(data: bytes) -> Dict[str, Any]:
  """{'wall_time', 'step', 'file_version'?, 'scalars': [(tag, simple_value)]}.

  Summary values other than simple_value (images, tensors, ...) are skipped."""
  event: Dict[str, Any] = {'wall_time': 0.0, 'step': 0, 'scalars': []}
  for field, wire_type, value in _fields(data):
    if field == 1 and wire_type == _FIXED64:
      event['wall_time'] = struct.unpack('<d', value)[0]
    elif field == 2 and wire_type == _VARINT:
      event['step'] = value - (1 << 64) if value >= 1 << 63 else value
    elif field == 3 and wire_type == _LEN:
      event['file_version'] = value.decode('utf-8')
    elif field == 5 and wire_type == _LEN:
      for vfield, vtype, vbytes in _fields(value):
        if vfield != 1 or vtype != _LEN:
          continue
        tag, simple = None, None
        for f, t, v in _fields(vbytes):
          if f == 1 and t == _LEN:
            tag = v.decode('utf-8')
          elif f == 2 and t == _FIXED32:
            simple = struct.unpack('<f', v)[0]
        if tag is not None and simple is not None:
          event['scalars'].append((tag, simple))
  return event


def event_files(directory: str) -> List[str]:
  """The event files in `directory`, in the order TensorBoard reads them (by name)."""
  if not os.path.isdir(directory):
    return []
  return [os.path.join(directory, f) for f in sorted(os.listdir(directory))
          if 'tfevents' in f and not f.startswith('.')]


def read_tfevents(path: str) -> List[Tuple[int, str, float]]:
  """(step, tag, value) of every scalar in an event file, or in every event file
  of a directory (in name order); raises ValueError on a CRC mismatch or a
  truncated record."""
  paths = event_files(path) if os.path.isdir(path) else [path]
  out = []
  for p in paths:
    with open(p, 'rb') as f:
      blob = f.read()
    for _, data in _iter_records(blob, where=f'{p}: '):
      event = decode_event(data)
      out.extend((event['step'], tag, value) for tag, value in event['scalars'])
  return out


def read_jsonl(path: str) -> List[dict]:
  """The records of a metrics.jsonl file (NaN/Infinity read back as floats)."""
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------
# Resume: drop what was logged after the checkpoint, atomically.

def _replace_atomically(path: str, data: bytes) -> None:
  """Write `data` to a temporary file beside `path`, then rename it over `path`:
  a crash leaves either the old or the new file, never a mix."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp',
                             dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def truncate_jsonl(path: str, max_step: Optional[int]) -> int:
  """Keep the lines of `path` with step <= max_step (all if None) and drop a
  final line torn by a crash (a complete one missing only its newline is
  kept); returns the number of lines dropped.

  Any other unreadable line raises ValueError (the log is damaged; nothing is
  dropped silently)."""
  if not os.path.exists(path):
    return 0
  with open(path, 'rb') as f:
    blob = f.read()
  lines = blob.split(b'\n')
  kept, dropped = [], 0
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    last = i == len(lines) - 1   # no newline after it: its write may not have finished
    try:
      step = json.loads(line)['step']
    except (ValueError, KeyError, TypeError) as e:
      if last:   # a record is one JSON object, so a cut-off line never parses
        dropped += 1
        continue
      raise ValueError(f'{path}:{i + 1}: unreadable metrics line ({e}); '
                       'fix or remove it before resuming.') from None
    if max_step is not None and step > max_step:
      dropped += 1
    else:
      kept.append(line)
  if dropped or lines[-1].strip():   # also add the newline a complete last line lacks
    _replace_atomically(path, b''.join(line + b'\n' for line in kept))
  return dropped


def truncate_tfevents(path: str, max_step: Optional[int]) -> int:
  """Keep the records of an event file with step <= max_step (all if None), and
  drop a final record torn by a crash; returns the number of records dropped.
  A CRC mismatch raises ValueError."""
  with open(path, 'rb') as f:
    blob = f.read()
  kept, end = [], 0
  dropped = 0
  for pos, data in _iter_records(blob, where=f'{path}: ', allow_torn_tail=True):
    end = pos + len(data) + 16
    if max_step is not None and decode_event(data)['step'] > max_step:
      dropped += 1
    else:
      kept.append(blob[pos:end])
  torn = end < len(blob)
  if dropped or torn:
    _replace_atomically(path, b''.join(kept))
  return dropped + int(torn)


# ---------------------------------------------------------------------------

def _scalar(name: str, value: Any) -> float:
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f'metric {name!r} must be a scalar; got shape {arr.shape}.')
  return float(arr.reshape(()))


class MetricWriter:
  """Scalar logs for one run: metrics.jsonl and a TensorBoard event file.

  Args:
    workdir: the run's directory; created if missing.
    enabled: False writes nothing at all (non-chief processes in multi-host).
    resume_step: when resuming from the checkpoint at this step, first drop
      the lines and event records an earlier run logged for later steps (and
      any line or record torn by a crash), so appending yields exactly the
      logs of an uninterrupted run. Without it a torn final JSON line is
      still repaired before appending.
    tensorboard: False writes only metrics.jsonl.

  write_scalars flushes both files to the OS, so a crash loses nothing already
  written; flush() also fsyncs (call it before saving a checkpoint).
  """

  def __init__(self, workdir: str, *, enabled: bool = True,
               resume_step: Optional[int] = None, tensorboard: bool = True):
    self.workdir = os.fspath(workdir)
    self.enabled = bool(enabled)
    self.jsonl_path = os.path.join(self.workdir, JSONL_NAME)
    self.tensorboard_dir = os.path.join(self.workdir, TENSORBOARD_DIR)
    self.events_path: Optional[str] = None
    self._jsonl = None
    self._events = None
    if not self.enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    truncate_jsonl(self.jsonl_path, resume_step)
    if resume_step is not None:
      for path in event_files(self.tensorboard_dir):
        truncate_tfevents(path, resume_step)
    self._jsonl = open(self.jsonl_path, 'a', encoding='utf-8')
    if tensorboard:
      os.makedirs(self.tensorboard_dir, exist_ok=True)
      self._events, self.events_path = self._new_event_file()
      self._events.write(encode_record(encode_event(time.time(), 0,
                                                    file_version=FILE_VERSION)))
      self._events.flush()

  def _new_event_file(self):
    base = os.path.join(self.tensorboard_dir,
                        f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}')
    path, n = base, 0
    while True:   # a resume within the same second must not reopen the old file
      try:
        return open(path, 'xb'), path
      except FileExistsError:
        n += 1
        path = f'{base}.{os.getpid()}.{n}'

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Log scalar metrics (floats, NumPy or jax scalars) for `step`."""
    if not self.enabled:
      return
    if self._jsonl is None:
      raise ValueError('MetricWriter is closed.')
    reserved = {'step', 'time'} & set(scalars)
    if reserved:
      raise ValueError(f'metric names {sorted(reserved)} are reserved for the record itself.')
    values = {str(k): _scalar(k, v) for k, v in scalars.items()}
    step, now = int(step), time.time()
    self._jsonl.write(json.dumps({'step': step, 'time': now, **values}) + '\n')
    self._jsonl.flush()
    if self._events is not None and values:
      self._events.write(encode_record(encode_event(now, step, scalars=values)))
      self._events.flush()

  def flush(self) -> None:
    """Flush both files and fsync them to disk."""
    for f in (self._jsonl, self._events):
      if f is not None:
        f.flush()
        os.fsync(f.fileno())

  def close(self) -> None:
    """Flush and close; further writes raise, a second close does nothing."""
    if self._jsonl is None:
      return
    self.flush()
    for f in (self._jsonl, self._events):
      if f is not None:
        f.close()
    self._jsonl = self._events = None

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------------

def _format_duration(seconds: float) -> str:
  s = int(round(seconds))
  h, rem = divmod(s, 3600)
  m, s = divmod(rem, 60)
  return f'{h:d}:{m:02d}:{s:02d}' if h else f'{m:02d}:{s:02d}'


def _format_value(v: Any) -> str:
  if isinstance(v, (str, bool, int)):
    return str(v)
  try:
    return f'{float(v):.4g}'
  except (TypeError, ValueError):
    return str(v)


class ProgressBar:
  """A dependency-free progress bar for the training loop.

      train  37% |███▋      | 370/1000 [00:12<00:20, 30.1 step/s] loss=0.123

  On a terminal it redraws one line in place ('\\r'), at most every
  `min_interval` seconds. Elsewhere (CI logs, files) it prints a full line only
  when another tenth of the total is reached, or after `line_interval`
  seconds without a line, so a log holds about a dozen lines per bar.

  The rate is measured from the first update on, so the time before it (jit
  compilation of the first step) does not drag the rate or the ETA down;
  elapsed time counts from construction. Postfix values are formatted (and jax
  arrays converted, which waits for them) only when a line is drawn.

  Args:
    total: number of steps, or None if unknown (no percentage or ETA).
    desc: label in front of the bar.
    stream: where to write; defaults to sys.stderr.
    min_interval: least number of seconds between two redraws on a terminal.
    clock: a monotonic time source in seconds (inject a fake one in tests).
    unit: the name of one step in the rate.
    width: bar width in characters.
    tty: force terminal (True) or log (False) output; default stream.isatty().
    line_interval: longest gap, in seconds, between two lines in log output.
  """

  _PARTIAL = ' ▏▎▍▌▋▊▉'

  def __init__(self, total: Optional[int], *, desc: str = '', stream=None,
               min_interval: float = 0.5, clock: Callable[[], float] = time.monotonic,
               unit: str = 'step', width: int = 10, tty: Optional[bool] = None,
               line_interval: float = 30.0):
    if total is not None and total < 0:
      raise ValueError(f'total must be >= 0 or None; got {total}.')
    self.total = total
    self.desc = desc
    self.stream = sys.stderr if stream is None else stream
    self.min_interval = float(min_interval)
    self.line_interval = float(line_interval)
    self.clock = clock
    self.unit = unit
    self.width = int(width)
    if tty is None:
      isatty = getattr(self.stream, 'isatty', None)
      tty = bool(isatty()) if callable(isatty) else False
    self.tty = tty
    encoding = getattr(self.stream, 'encoding', None) or 'utf-8'
    try:
      self._PARTIAL.encode(encoding)
      self._full, self._partial = '█', self._PARTIAL
    except (UnicodeEncodeError, LookupError):
      self._full, self._partial = '#', ' '
    self.n = 0
    self.postfix: Dict[str, Any] = {}
    self._start = clock()
    self._first: Optional[Tuple[int, float]] = None   # (n, time) at the first update
    self._last_draw_time = -math.inf
    self._last_drawn_n: Optional[int] = None
    self._last_tenth = -1
    self._last_len = 0
    self._closed = False

  def rate(self, now: Optional[float] = None) -> Optional[float]:
    """Steps per second since the first update (since construction before a
    second update); None while unknown."""
    now = self.clock() if now is None else now
    if self._first is not None:
      n0, t0 = self._first
      if self.n > n0 and now > t0:
        return (self.n - n0) / (now - t0)
    elapsed = now - self._start
    return self.n / elapsed if self.n > 0 and elapsed > 0 else None

  def format(self, now: Optional[float] = None) -> str:
    """The current line, without '\\r' or newline."""
    now = self.clock() if now is None else now
    elapsed = _format_duration(now - self._start)
    rate = self.rate(now)
    if rate is None:
      speed = f'? {self.unit}/s'
    elif rate >= 1 or rate == 0:
      speed = f'{rate:.1f} {self.unit}/s'
    else:
      speed = f'{1 / rate:.2f} s/{self.unit}'
    parts = [self.desc] if self.desc else []
    if self.total:
      frac = min(self.n / self.total, 1.0)
      cells = frac * self.width
      full = int(cells)
      bar = self._full * full
      if full < self.width:
        bar += self._partial[int((cells - full) * len(self._partial))]
      bar = bar.ljust(self.width)
      if self.n >= self.total:
        eta = _format_duration(0)
      elif rate:
        eta = _format_duration((self.total - self.n) / rate)
      else:
        eta = '?'
      parts += [f'{int(100 * frac):3d}%', f'|{bar}|',
                f'{self.n}/{self.total}', f'[{elapsed}<{eta}, {speed}]']
    else:
      parts += [f'{self.n}', f'[{elapsed}, {speed}]']
    parts += [f'{k}={_format_value(v)}' for k, v in self.postfix.items()]
    return ' '.join(parts)

  def _draw(self, now: float) -> None:
    line = self.format(now)
    if self.tty:
      self.stream.write('\r' + line + ' ' * max(0, self._last_len - len(line)))
    else:
      self.stream.write(line + '\n')
    self.stream.flush()
    self._last_len = len(line)
    self._last_draw_time = now
    self._last_drawn_n = self.n

  def update(self, n: int = 1, **postfix) -> None:
    """Advance by n steps; keyword values replace the postfix shown after the bar."""
    if self._closed:
      raise ValueError('ProgressBar is closed.')
    self.n += n
    self.postfix.update(postfix)
    now = self.clock()
    if self._first is None:
      self._first = (self.n, now)
    done = self.total is not None and self.n >= self.total
    if self.tty:
      if done or now - self._last_draw_time >= self.min_interval:
        self._draw(now)
      return
    tenth = min(10 * self.n // self.total, 10) if self.total else -1
    if (tenth > self._last_tenth
        or now - self._last_draw_time >= max(self.line_interval, self.min_interval)):
      self._last_tenth = max(tenth, self._last_tenth)
      self._draw(now)

  def close(self) -> None:
    """Draw the final state (if not yet shown) and end the line."""
    if self._closed:
      return
    self._closed = True
    if self._last_drawn_n != self.n:
      self._draw(self.clock())
    if self.tty:
      self.stream.write('\n')
      self.stream.flush()

  def __enter__(self) -> 'ProgressBar':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------------
# Per-epoch statistics as CSV (one row per validation, for spreadsheets).

def append_csv_row(path: str, row: Mapping[str, Any], *, resume_step: Optional[int] = None
                   ) -> None:
  """Appends `row` (needs a 'step') to the CSV at `path`, writing the header first.

  The columns are fixed by the first row written; a later row's new keys are an
  error (the file would no longer parse), missing ones are left empty. With
  resume_step, rows with step > resume_step are first dropped (atomically), so a
  resumed run's file equals an uninterrupted run's.
  """
  if resume_step is not None and os.path.exists(path):
    with open(path, newline='', encoding='utf-8') as f:
      rows = list(csv.DictReader(f))
    keep = [r for r in rows if int(r['step']) <= resume_step]
    if len(keep) != len(rows):
      fields = list(rows[0].keys())
      buf = io.StringIO()
      writer = csv.DictWriter(buf, fieldnames=fields, lineterminator='\n')
      writer.writeheader()
      writer.writerows(keep)
      _replace_atomically(path, buf.getvalue().encode('utf-8'))
  if os.path.exists(path) and os.path.getsize(path) > 0:
    with open(path, newline='', encoding='utf-8') as f:
      fields = next(csv.reader(f))
    extra = sorted(set(row) - set(fields))
    if extra:
      raise ValueError(f'{path} has no column(s) {extra}; its columns are {fields}.')
  else:
    fields = ['step'] + sorted(k for k in row if k != 'step')
    with open(path, 'w', newline='', encoding='utf-8') as f:
      csv.writer(f, lineterminator='\n').writerow(fields)
  with open(path, 'a', newline='', encoding='utf-8') as f:
    csv.DictWriter(f, fieldnames=fields, lineterminator='\n').writerow(
        {k: _csv_value(v) for k, v in row.items()})


def _csv_value(v):
  return f'{float(v):.6g}' if isinstance(v, (float, np.floating)) else v


def read_csv(path: str) -> List[dict]:
  with open(path, newline='', encoding='utf-8') as f:
    return list(csv.DictReader(f))
