"""Metric logs (JSONL + hand-written TensorBoard events), progress bar and plots."""
import io
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.analysis import plots
from cnn_jax.train import writers

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


# --- CRC-32C and the event encoding -----------------------------------------

def test_crc32c_known_vectors():
  # The check value of CRC-32C, and the iSCSI test vectors of RFC 3720 B.4.
  assert writers.crc32c(b'') == 0
  assert writers.crc32c(b'123456789') == 0xE3069283
  assert writers.crc32c(bytes(32)) == 0x8A9136AA
  assert writers.crc32c(b'\xff' * 32) == 0x62A8AB43
  assert writers.crc32c(bytes(range(32))) == 0x46DD794E
  crc = writers.crc32c(b'abc')
  rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
  assert writers.masked_crc32c(b'abc') == (rotated + 0xA282EAD8) % 2**32


def _protobuf_event_class():
  """Event/Summary message classes built from descriptors, as a second opinion
  on the wire format (protobuf ships with the stack; TensorFlow does not)."""
  pytest.importorskip('google.protobuf')
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
  F = descriptor_pb2.FieldDescriptorProto
  fdp = descriptor_pb2.FileDescriptorProto(name='cnn_jax_event_check.proto',
                                           package='cnn_jax_check', syntax='proto3')
  summary = fdp.message_type.add(name='Summary')
  value = summary.nested_type.add(name='Value')
  value.field.add(name='tag', number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
  value.field.add(name='simple_value', number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
  summary.field.add(name='value', number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                    type_name='.cnn_jax_check.Summary.Value')
  event = fdp.message_type.add(name='Event')
  event.field.add(name='wall_time', number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
  event.field.add(name='step', number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
  event.field.add(name='file_version', number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
  event.field.add(name='summary', number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                  type_name='.cnn_jax_check.Summary')
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName('cnn_jax_check.Event'))


def test_event_encoding_agrees_with_protobuf():
  Event = _protobuf_event_class()
  ours = writers.encode_event(1234.5, 70000, scalars={'train/loss': 0.25, 'val/é': -3.0})
  ev = Event.FromString(ours)
  assert ev.wall_time == 1234.5 and ev.step == 70000
  assert [(v.tag, v.simple_value) for v in ev.summary.value] == [('train/loss', 0.25),
                                                                 ('val/é', -3.0)]
  header = Event.FromString(writers.encode_event(1.0, 0, file_version='brain.Event:2'))
  assert header.file_version == 'brain.Event:2'
  # And the other way: protobuf's bytes through our decoder, negative step included.
  theirs = Event(wall_time=2.0, step=-5, summary={'value': [{'tag': 'a', 'simple_value': 1.5}]})
  assert writers.decode_event(theirs.SerializeToString()) == {
      'wall_time': 2.0, 'step': -5, 'scalars': [('a', 1.5)]}


# --- MetricWriter -------------------------------------------------------------

def test_writer_round_trip_jsonl_and_events(tmp_path):
  with writers.MetricWriter(tmp_path) as w:
    w.write_scalars(0, {'train/loss': 1.5, 'train/accuracy': np.float32(0.25)})
    w.write_scalars(jnp.int32(10), {'val/accuracy': jnp.array(0.5), 'val/loss': 1 / 3})
    events_path = w.events_path
  records = writers.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records] == [0, 10]
  assert records[0]['train/accuracy'] == 0.25 and records[1]['val/loss'] == 1 / 3
  assert all(isinstance(r['time'], float) for r in records)
  assert os.path.dirname(events_path) == str(tmp_path / 'tensorboard')
  assert os.path.basename(events_path).startswith('events.out.tfevents.')
  scalars = writers.read_tfevents(events_path)
  assert scalars == [(0, 'train/loss', 1.5), (0, 'train/accuracy', 0.25),
                     (10, 'val/accuracy', 0.5),
                     (10, 'val/loss', float(np.float32(1 / 3)))]   # simple_value is float32
  assert writers.read_tfevents(str(tmp_path / 'tensorboard')) == scalars
  blob = open(events_path, 'rb').read()
  first = next(writers._iter_records(blob))[1]
  assert writers.decode_event(first)['file_version'] == 'brain.Event:2'
  with pytest.raises(ValueError, match='closed'):
    w.write_scalars(11, {'x': 1.0})
  w.close()   # a second close is harmless


def test_read_tfevents_detects_corruption(tmp_path):
  with writers.MetricWriter(tmp_path) as w:
    w.write_scalars(1, {'loss': 2.0})
    path = w.events_path
  blob = open(path, 'rb').read()
  (first_len,) = struct.unpack('<Q', blob[:8])
  second = 12 + first_len + 4            # where the second record starts
  for offset, message in [(second + 12 + 5, 'CRC mismatch in the data'),   # a data byte
                          (second + 1, 'CRC mismatch in the length'),      # a length byte
                          (len(blob) - 1, 'CRC mismatch in the data')]:    # the data CRC
    bad = bytearray(blob)
    bad[offset] ^= 0x01
    (tmp_path / 'bad').write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=message):
      writers.read_tfevents(str(tmp_path / 'bad'))
  (tmp_path / 'bad').write_bytes(blob[:-3])
  with pytest.raises(ValueError, match='truncated record'):
    writers.read_tfevents(str(tmp_path / 'bad'))


def test_writer_checks_its_input_and_disabled_writes_nothing(tmp_path):
  with writers.MetricWriter(tmp_path, tensorboard=False) as w:
    with pytest.raises(ValueError, match='reserved'):
      w.write_scalars(0, {'step': 1.0})
    with pytest.raises(ValueError, match="'x' must be a scalar"):
      w.write_scalars(0, {'x': np.zeros(3)})
  assert not (tmp_path / 'tensorboard').exists()
  off = writers.MetricWriter(tmp_path / 'worker1', enabled=False)
  off.write_scalars(0, {'loss': 1.0})
  off.flush()
  off.close()
  assert not (tmp_path / 'worker1').exists()


def _log(w, steps):
  for s in steps:
    m = {'train/loss': 1.0 / (s + 1), 'train/lr': 0.1}
    if s % 5 == 0:
      m['val/accuracy'] = s / 10
    w.write_scalars(s, m)


def _contents(workdir):
  lines = [{k: v for k, v in r.items() if k != 'time'}
           for r in writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))]
  return lines, writers.read_tfevents(os.path.join(workdir, 'tensorboard'))


def test_resume_truncates_logs_to_match_an_uninterrupted_run(tmp_path):
  with writers.MetricWriter(tmp_path / 'straight') as w:
    _log(w, range(11))
  crashed = tmp_path / 'crashed'
  with writers.MetricWriter(crashed) as w:
    _log(w, range(9))                   # checkpoint at 5, then ran on to 8 and died
    events_path = w.events_path
  with open(crashed / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 9, "train/lo')      # a line torn by the crash
  with open(events_path, 'ab') as f:
    f.write(writers.encode_record(writers.encode_event(0.0, 9, scalars={'x': 1.0}))[:-6])
  with writers.MetricWriter(crashed, resume_step=5) as w:
    assert w.events_path != events_path
    _log(w, range(6, 11))
  assert _contents(crashed) == _contents(tmp_path / 'straight')
  assert len(writers.event_files(str(crashed / 'tensorboard'))) == 2
  leftovers = [f for d in (crashed, crashed / 'tensorboard') for f in os.listdir(d)
               if f.endswith('.tmp')]
  assert leftovers == []
  # Resuming again at the same step changes nothing already consistent.
  before = (crashed / 'metrics.jsonl').read_bytes()
  writers.MetricWriter(crashed, resume_step=10, tensorboard=False).close()
  assert (crashed / 'metrics.jsonl').read_bytes() == before


def test_truncate_jsonl_refuses_damaged_middle_lines(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "a": 1}\nnot json\n{"step": 3, "a": 2}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl:2: unreadable'):
    writers.truncate_jsonl(str(path), 2)
  path.write_text('{"step": 1, "a": NaN}\n{"step": 3, "a": 2}\n')
  assert writers.truncate_jsonl(str(path), 2) == 1
  (rec,) = writers.read_jsonl(str(path))
  assert rec['step'] == 1 and np.isnan(rec['a'])
  path.write_text('{"step": 1}\n{"step": 2}')    # complete, only the newline missing
  assert writers.truncate_jsonl(str(path), None) == 0
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_tensorboard_reads_our_event_file(tmp_path):
  loader_mod = pytest.importorskip('tensorboard.backend.event_processing.event_file_loader')
  with writers.MetricWriter(tmp_path) as w:
    w.write_scalars(3, {'train/loss': 0.5})
    path = w.events_path
  # The legacy loader yields the events as written; EventFileLoader migrates
  # simple_value into a tensor.
  loader = getattr(loader_mod, 'LegacyEventFileLoader', loader_mod.EventFileLoader)
  events = list(loader(path).Load())
  assert events[0].file_version == 'brain.Event:2'
  values = [(e.step, v.tag, v.simple_value or v.tensor.float_val[0])
            for e in events[1:] for v in e.summary.value]
  assert values == [(3, 'train/loss', 0.5)]


# --- ProgressBar --------------------------------------------------------------

class FakeClock:
  def __init__(self, t=0.0):
    self.t = t

  def __call__(self):
    return self.t


class TtyIO(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_line_rate_and_eta():
  clock, out = FakeClock(), io.StringIO()
  bar = writers.ProgressBar(1000, desc='train', stream=out, clock=clock)
  clock.t = 10.0                 # the first step includes compilation ...
  bar.update(1)
  clock.t = 20.0                 # ... and is left out of the rate: 300 steps / 10 s
  bar.update(300, loss=jnp.float32(0.123456), epoch=2)
  assert bar.rate() == pytest.approx(30.0)
  assert bar.format() == ('train  30% |███       | 301/1000 [00:20<00:23, 30.0 step/s] '
                          'loss=0.1235 epoch=2')
  clock.t = 30.0
  bar.update(369)                # 669 steps done in 20 s since the first: 33.45 step/s
  assert bar.format() == ('train  67% |██████▋   | 670/1000 [00:30<00:10, 33.5 step/s] '
                          'loss=0.1235 epoch=2')
  slow = writers.ProgressBar(None, stream=out, clock=FakeClock())
  slow.clock.t = 4.0
  slow.update(2)
  assert slow.format() == '2 [00:04, 2.00 s/step]'
  assert writers.ProgressBar(5, stream=out, clock=FakeClock()).format() == (
      '  0% |          | 0/5 [00:00<?, ? step/s]')


def test_progress_bar_log_output_is_short():
  clock, out = FakeClock(), io.StringIO()
  with writers.ProgressBar(1000, desc='epoch', stream=out, clock=clock) as bar:
    for _ in range(1000):
      clock.t += 0.1
      bar.update()
  lines = out.getvalue().splitlines()
  assert '\r' not in out.getvalue()
  assert len(lines) == 11        # the first step, then every tenth
  assert lines[-1].startswith('epoch 100% |██████████| 1000/1000 [01:40<00:00, 10.0 step/s]')
  # With no total, a line every line_interval seconds, and the final state on close.
  clock, out = FakeClock(), io.StringIO()
  with writers.ProgressBar(None, stream=out, clock=clock, line_interval=30) as bar:
    for _ in range(100):
      clock.t += 1
      bar.update()
  assert [l.split()[0] for l in out.getvalue().splitlines()] == ['1', '31', '61', '91', '100']


def test_progress_bar_tty_redraws_in_place():
  clock, out = FakeClock(), TtyIO()
  bar = writers.ProgressBar(20, stream=out, clock=clock, min_interval=0.5)
  for _ in range(20):
    clock.t += 0.2
    bar.update(loss=1.0)
  text = out.getvalue()
  assert '\n' not in text
  # Drawn at 0.2 s, then every >= 0.5 s (0.8, 1.4, 2.0, 2.6, 3.2, 3.8), and at 100%.
  assert text.count('\r') == 8
  bar.close()
  assert out.getvalue().endswith('| 20/20 [00:04<00:00, 5.0 step/s] loss=1\n')
  with pytest.raises(ValueError, match='closed'):
    bar.update()


def test_progress_bar_ascii_stream():
  raw = io.BytesIO()
  stream = io.TextIOWrapper(raw, encoding='ascii')
  bar = writers.ProgressBar(4, stream=stream, clock=FakeClock(), tty=False)
  bar.update(2)
  bar.close()
  stream.flush()
  assert b'|#####     | 2/4' in raw.getvalue()


# --- plots --------------------------------------------------------------------

DPI = 50   # small figures render fast; the checks do not depend on resolution


def _assert_png(path, low=2_000, high=1_000_000):
  data = open(path, 'rb').read()
  assert data[:8] == PNG_MAGIC
  assert low < len(data) < high


def test_plot_training_curves(tmp_path):
  with writers.MetricWriter(tmp_path, tensorboard=False) as w:
    for s in range(0, 200, 10):
      m = {'train/loss': 2.0 / (1 + s / 50), 'train/accuracy': s / 250, 'train/lr': 0.1}
      if s % 50 == 0:
        m.update({'val/loss': 2.2 / (1 + s / 60), 'val/accuracy': s / 300})
      w.write_scalars(s, m)
  records = writers.read_jsonl(tmp_path / 'metrics.jsonl')
  path = plots.plot_training_curves(records, str(tmp_path / 'figs' / 'curves.png'), dpi=DPI)
  assert path == str(tmp_path / 'figs' / 'curves.png')
  _assert_png(path)
  _assert_png(plots.plot_training_curves(records, tmp_path / 'lr.png', keys=['train/lr'], dpi=DPI))
  with pytest.raises(ValueError, match="no logged metric matches 'top5_accuracy'"):
    plots.plot_training_curves(records, tmp_path / 'x.png', keys=['top5_accuracy'])
  with pytest.raises(ValueError, match='no records'):
    plots.plot_training_curves([], tmp_path / 'x.png')


def test_plot_confusion_matrix(tmp_path):
  rng = np.random.default_rng(0)
  cm = rng.integers(0, 30, (4, 4)) + np.diag([50, 40, 0, 30])
  cm[2] = 0                                        # a class with no examples
  path = plots.plot_confusion_matrix(cm, str(tmp_path / 'cm.png'),
                                     class_names=['cat', 'dog', 'eel', 'fox'], dpi=DPI)
  _assert_png(path)
  _assert_png(plots.plot_confusion_matrix(rng.integers(0, 9, (30, 30)), tmp_path / 'big.png',
                                          normalize=False, dpi=DPI))
  with pytest.raises(ValueError, match='2 class names for 4 classes'):
    plots.plot_confusion_matrix(cm, tmp_path / 'x.png', class_names=['a', 'b'])
  assert not (tmp_path / 'x.png').exists()
