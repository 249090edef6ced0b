"""A small reader and writer of the safetensors format, with NumPy only.

The format (https://huggingface.co/docs/safetensors) holds named arrays and
nothing executable, so a file from anywhere is safe to read:

    8 bytes      N, the header length, unsigned little-endian
    N bytes      a UTF-8 JSON object {name: {"dtype": "F32", "shape": [2, 3],
                 "data_offsets": [begin, end]}, ...} with an optional
                 "__metadata__": {str: str} entry; trailing spaces may pad it
    the rest     the arrays' raw little-endian bytes, C order; the offsets are
                 relative to the start of this byte buffer, and the arrays tile
                 it exactly: no gaps, no overlaps, nothing left over

dtypes: F64 F32 F16 BF16 (ml_dtypes.bfloat16, which jax ships) I64 I32 I16 I8
U64 U32 U16 U8 BOOL. Anything malformed (a header longer than the file, bad
JSON, an unknown dtype, offsets that disagree with the shape or do not tile
the buffer) raises ValueError naming what is wrong. The `safetensors` package
is not needed.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from typing import Dict, Mapping, Optional, Tuple, Union

import ml_dtypes
import numpy as np

PathLike = Union[str, os.PathLike]

DTYPES: Dict[str, np.dtype] = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16),
    'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32), 'I16': np.dtype(np.int16),
    'I8': np.dtype(np.int8),
    'U64': np.dtype(np.uint64), 'U32': np.dtype(np.uint32), 'U16': np.dtype(np.uint16),
    'U8': np.dtype(np.uint8),
    'BOOL': np.dtype(np.bool_),
}
_CODES = {dt: code for code, dt in DTYPES.items()}

# The reference implementation's limit: a larger header is a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000
_METADATA = '__metadata__'


def _little_endian(a: np.ndarray) -> np.ndarray:
  # Native order on every machine JAX runs on; swap only where it is not.
  if sys.byteorder != 'little' and a.dtype.itemsize > 1:
    return a.byteswap()
  return a


def save(tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None
         ) -> bytes:
  """Serialises named arrays (and optional string metadata) to safetensors bytes.

  Args:
    tensors: name -> array (or anything np.asarray takes) of a supported dtype.
    metadata: optional str -> str pairs stored as the header's "__metadata__".

  Returns:
    The file's bytes. Arrays are laid out by decreasing item size, then name, and
    the header is padded with spaces to a multiple of 8 bytes, so every array
    starts aligned to its item size.
  """
  arrays = {}
  for name, value in tensors.items():
    if not isinstance(name, str) or name == _METADATA:
      raise ValueError(f'safetensors: tensor names must be strings other than '
                       f'{_METADATA!r}, got {name!r}.')
    a = np.asarray(value)
    if a.dtype.byteorder == '>' or (a.dtype.byteorder == '<' and sys.byteorder != 'little'):
      a = a.astype(a.dtype.newbyteorder('='))
    if a.dtype not in _CODES:
      raise ValueError(f'safetensors: tensor {name!r} has dtype {a.dtype}, which the '
                       f'format cannot hold; supported: {", ".join(DTYPES)}.')
    arrays[name] = a
  header: Dict[str, object] = {}
  if metadata:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
      raise ValueError('safetensors: metadata must map str to str.')
    header[_METADATA] = dict(metadata)
  order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
  offset = 0
  for name in order:
    a = arrays[name]
    header[name] = {'dtype': _CODES[a.dtype], 'shape': list(a.shape),
                    'data_offsets': [offset, offset + a.nbytes]}
    offset += a.nbytes
  text = json.dumps(header, separators=(',', ':')).encode('utf-8')
  text += b' ' * (-(8 + len(text)) % 8)
  chunks = [struct.pack('<Q', len(text)), text]
  chunks += [_little_endian(np.ascontiguousarray(arrays[n])).tobytes() for n in order]
  return b''.join(chunks)


def _reject_duplicates(pairs):
  keys = [k for k, _ in pairs]
  dup = sorted({k for k in keys if keys.count(k) > 1})
  if dup:
    raise ValueError(f'safetensors: header repeats the key(s) {dup}.')
  return dict(pairs)


def _parse_header(data: bytes) -> Tuple[Dict[str, dict], Dict[str, str], int]:
  """(entries, metadata, start of the byte buffer), every entry checked."""
  if len(data) < 8:
    raise ValueError(f'safetensors: {len(data)} bytes is too short for the 8-byte '
                     'header length.')
  (n,) = struct.unpack('<Q', data[:8])
  if n > MAX_HEADER_BYTES:
    raise ValueError(f'safetensors: header length {n} exceeds the {MAX_HEADER_BYTES} '
                     'byte limit (a corrupt or non-safetensors file).')
  if 8 + n > len(data):
    raise ValueError(f'safetensors: header length {n} runs past the end of the '
                     f'{len(data)}-byte file.')
  try:
    header = json.loads(data[8:8 + n].decode('utf-8'), object_pairs_hook=_reject_duplicates)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'safetensors: the header is not valid UTF-8 JSON ({e}).') from None
  if not isinstance(header, dict):
    raise ValueError(f'safetensors: the header must be a JSON object, got '
                     f'{type(header).__name__}.')
  metadata = header.pop(_METADATA, None) or {}
  if not isinstance(metadata, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
    raise ValueError('safetensors: "__metadata__" must be an object of strings.')
  buffer_len = len(data) - 8 - n
  spans = []
  for name, entry in header.items():
    where = f'safetensors: tensor {name!r}'
    if not isinstance(entry, dict) or set(entry) != {'dtype', 'shape', 'data_offsets'}:
      raise ValueError(f'{where}: entry must be an object with exactly "dtype", "shape" '
                       f'and "data_offsets", got {entry!r}.')
    if entry['dtype'] not in DTYPES:
      raise ValueError(f'{where}: unknown dtype {entry["dtype"]!r}; supported: '
                       f'{", ".join(DTYPES)}.')
    shape, offsets = entry['shape'], entry['data_offsets']
    if not isinstance(shape, list) or not all(
        type(d) is int and d >= 0 for d in shape):  # pylint: disable=unidiomatic-typecheck
      raise ValueError(f'{where}: shape must be a list of non-negative ints, got {shape!r}.')
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(
        type(o) is int for o in offsets):  # pylint: disable=unidiomatic-typecheck
      raise ValueError(f'{where}: data_offsets must be [begin, end] ints, got {offsets!r}.')
    begin, end = offsets
    if not 0 <= begin <= end <= buffer_len:
      raise ValueError(f'{where}: data_offsets {offsets} fall outside the '
                       f'{buffer_len}-byte data buffer.')
    nbytes = math.prod(shape) * DTYPES[entry['dtype']].itemsize
    if end - begin != nbytes:
      raise ValueError(f'{where}: data_offsets {offsets} span {end - begin} bytes, but '
                       f'{entry["dtype"]} {shape} needs {nbytes}.')
    spans.append((begin, end, name))
  # The arrays must tile the buffer: sorted by offset, each starts where the last ended.
  pos = 0
  for begin, end, name in sorted(spans):
    if begin != pos:
      raise ValueError(f'safetensors: tensor {name!r} starts at byte {begin} of the data '
                       f'buffer, expected {pos} (gap or overlap between tensors).')
    pos = end
  if pos != buffer_len:
    raise ValueError(f'safetensors: the tensors cover {pos} bytes of the {buffer_len}-byte '
                     'data buffer (trailing bytes).')
  return header, metadata, 8 + n


def load(data: bytes) -> Dict[str, np.ndarray]:
  """Parses safetensors bytes into name -> array (writable copies, native order)."""
  header, _, start = _parse_header(bytes(data))
  out = {}
  for name, entry in header.items():
    dt = DTYPES[entry['dtype']]
    begin, end = entry['data_offsets']
    a = np.frombuffer(data, dtype=dt, count=(end - begin) // dt.itemsize,
                      offset=start + begin)
    out[name] = _little_endian(a).reshape(entry['shape']).copy()
  return out


def read_metadata(data: bytes) -> Dict[str, str]:
  """The header's "__metadata__" (empty if none), after checking the header."""
  return _parse_header(bytes(data))[1]


def save_file(tensors: Mapping[str, np.ndarray], path: PathLike,
              metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes `save(tensors, metadata)` to `path`."""
  with open(path, 'wb') as f:
    f.write(save(tensors, metadata))


def load_file(path: PathLike) -> Dict[str, np.ndarray]:
  """Reads a .safetensors file into name -> array; ValueError if malformed."""
  with open(path, 'rb') as f:
    return load(f.read())
