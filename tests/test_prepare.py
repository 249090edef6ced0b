"""`make data` (cnn_jax.data.prepare): offline checks that fail fast, embedded datasets
prepared in-process, and a prepared dataset is never rewritten. No network, no TF."""
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cnn_jax.data import prepare
from cnn_jax.data import sources


def run(capsys, *argv):
  rc = prepare.main(list(argv))
  captured = capsys.readouterr()
  return rc, captured.out, captured.err


def snapshot(root):
  """Every path under root with its mtime (ns) and size."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs + files:
      p = os.path.join(d, name)
      st = os.stat(p)
      out[p] = (st.st_mtime_ns, st.st_size)
  return out


@pytest.fixture
def offline(monkeypatch):
  """Every socket connect fails as with no DNS; returns the addresses tried."""
  tried = []

  def refuse(address, *args, **kwargs):
    tried.append(address)
    raise socket.gaierror(-2, 'Name or service not known')

  monkeypatch.setattr(socket, 'create_connection', refuse)
  return tried


@pytest.fixture
def no_tf(monkeypatch, tmp_path):
  """This interpreter has no TensorFlow and no TF venv exists; nothing may be
  installed or started."""
  def forbidden(*args, **kwargs):
    raise AssertionError(f'must not run {args!r}')

  monkeypatch.setattr(prepare, 'tf_available', lambda: False)
  monkeypatch.setattr(subprocess, 'call', forbidden)
  monkeypatch.setattr(subprocess, 'check_call', forbidden)
  return str(tmp_path / 'no-tf-venv')


def test_module_imports_without_tensorflow_or_cnn_jax(tmp_path):
  # As in the TF venv: loaded by path, cnn_jax not importable, nothing heavy imported.
  code = textwrap.dedent(f"""
      import importlib.util, sys
      spec = importlib.util.spec_from_file_location('prepare', {prepare.__file__!r})
      m = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(m)
      heavy = [k for k in ('tensorflow', 'tensorflow_datasets', 'jax', 'grain', 'cnn_jax')
               if k in sys.modules]
      assert not heavy, heavy
      assert m.embedded_builders() == {{}}
      print('ok')
  """)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  res = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
  assert res.returncode == 0 and res.stdout.strip() == 'ok', res.stderr


def test_embedded_prepares_once_and_is_never_rewritten(tmp_path, capsys, monkeypatch, no_tf):
  data_dir = str(tmp_path / 'data')
  rc, out, _ = run(capsys, '--dataset=digits', f'--data_dir={data_dir}')
  assert rc == 0
  version_dir = os.path.join(data_dir, 'digits', '1.0.0')
  assert f'Prepared \'digits\' in {version_dir}' in out
  assert f'--config.dataset=digits --config.data_dir={data_dir}' in out
  assert prepare.existing_state(version_dir) == 'array_record'
  assert len(sources.get_source('digits', 'test', data_dir)) == 360

  before = snapshot(data_dir)
  monkeypatch.setattr(sources, 'prepare_embedded',
                      lambda *a, **k: pytest.fail('prepared again'))
  rc, out, _ = run(capsys, '--dataset=digits', f'--data_dir={data_dir}')
  assert rc == 0 and 'already prepared' in out and 'left untouched' in out
  assert snapshot(data_dir) == before


def test_catalog_offline_fails_within_seconds(tmp_path, capsys, offline, no_tf):
  data_dir = str(tmp_path / 'data')
  t0 = time.monotonic()
  rc, out, err = run(capsys, '--dataset=mnist', f'--data_dir={data_dir}',
                     f'--tf_venv={no_tf}')
  assert time.monotonic() - t0 < 5
  assert rc == 1 and not out
  assert offline == [('storage.googleapis.com', 443)]
  assert 'storage.googleapis.com:443: [Errno -2] Name or service not known' in err
  assert 'make data DATASET=mnist DATA_DIR=DIR' in err  # prepare elsewhere, copy here
  assert f'make data DATASET=mnist DATA_DIR={data_dir} PREPARE_ARGS=--skip_network_check' in err
  assert 'digits, mnist1d' in err
  assert not os.path.exists(data_dir)  # nothing written
  assert 'tensorflow' not in sys.modules


def test_hanging_host_is_given_up_after_the_timeout(tmp_path, capsys, monkeypatch, no_tf):
  release = threading.Event()

  def hang(address, *args, **kwargs):
    release.wait(30)
    raise OSError('released')

  monkeypatch.setattr(socket, 'create_connection', hang)
  try:
    t0 = time.monotonic()
    rc, _, err = run(capsys, '--dataset=cifar10', f'--data_dir={tmp_path}',
                     '--check_timeout=0.3', f'--tf_venv={no_tf}')
    assert time.monotonic() - t0 < 3
  finally:
    release.set()
  assert rc == 1
  assert 'www.cs.toronto.edu:443: no answer within 0.3 s' in err


def test_catalog_already_prepared_is_left_untouched(tmp_path, capsys, offline, no_tf):
  data_dir = str(tmp_path)
  version_dir = prepare.resolve_catalog('mnist', data_dir).version_dir
  assert version_dir == os.path.join(data_dir, 'mnist', '3.0.1')
  os.makedirs(version_dir)
  for f in ('dataset_info.json', 'features.json', 'mnist-train.array_record-00000-of-00001'):
    with open(os.path.join(version_dir, f), 'w') as fh:
      fh.write('{}')
  before = snapshot(data_dir)
  rc, out, _ = run(capsys, '--dataset=mnist', f'--data_dir={data_dir}', '--install_tf_venv',
                   f'--tf_venv={no_tf}')
  assert rc == 0
  assert f"'mnist' is already prepared in {version_dir}; left untouched." in out
  assert f'--config.dataset=mnist --config.data_dir={data_dir}' in out
  assert offline == []  # decided before any network check or install
  assert snapshot(data_dir) == before


@pytest.mark.parametrize('files, expected', [
    (('dataset_info.json', 'mnist-train.tfrecord-00000-of-00001'), 'not as array_record'),
    ((), 'holds no dataset_info.json'),
])
def test_other_content_in_the_version_dir_is_reported_not_replaced(
    tmp_path, capsys, offline, no_tf, files, expected):
  version_dir = os.path.join(tmp_path, 'mnist', '3.0.1')
  os.makedirs(version_dir)
  for f in files:
    with open(os.path.join(version_dir, f), 'w') as fh:
      fh.write('{}')
  before = snapshot(tmp_path)
  rc, _, err = run(capsys, '--dataset=mnist', f'--data_dir={tmp_path}', '--install_tf_venv',
                   f'--tf_venv={no_tf}')
  assert rc == 1 and expected in err and 'untouched' in err
  assert offline == []
  assert snapshot(tmp_path) == before


def test_unknown_name_lists_known_names(tmp_path, capsys, offline, no_tf):
  rc, _, err = run(capsys, '--dataset=mnistt', f'--data_dir={tmp_path}', f'--tf_venv={no_tf}')
  assert rc == 1
  assert "Unknown dataset 'mnistt'. Did you mean: mnist" in err
  assert 'Embedded (offline, generated here): digits, mnist1d' in err
  assert 'cifar10, cifar100, imagenet2012' in err and '--list' in err
  assert 'PREPARE_ARGS=--tf_builder' in err  # builders that need TF are not listed here
  rc, _, err = run(capsys, '--dataset=cifar10/foo', f'--data_dir={tmp_path}')
  assert rc == 1 and "'cifar10' has no configs" in err
  rc, _, err = run(capsys, '--dataset=cifar10:1.0.0', f'--data_dir={tmp_path}')
  assert rc == 1 and "no version '1.0.0'; tfds knows 3.0.2" in err
  assert offline == []


def test_list(capsys):
  rc, out, _ = run(capsys, '--list')
  assert rc == 0 and 'digits, mnist1d' in out
  catalog = out.split('Catalog (tensorflow-datasets):')[1].replace('\n', ' ')
  names = {n.strip() for n in catalog.split(',')}
  assert {'mnist', 'cifar10', 'imagenet2012', 'oxford_iiit_pet'} <= names
  assert 'digits' not in names


def test_imagenet_manual_dir_says_what_to_put_there(tmp_path, capsys, offline, no_tf,
                                                    monkeypatch):
  data_dir = str(tmp_path)
  manual = os.path.join(data_dir, 'downloads', 'manual')
  rc, _, err = run(capsys, '--dataset=imagenet2012', f'--data_dir={data_dir}',
                   f'--tf_venv={no_tf}')
  assert rc == 1
  assert f'{manual} does not exist' in err
  for f in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'):
    assert f'  {os.path.join(manual, f)}\n' in err
  assert f'{os.path.join(manual, "ILSVRC2012_img_test.tar")}   (optional)' in err
  assert 'image-net.org' in err
  assert f'make data DATASET=imagenet2012 DATA_DIR={data_dir}' in err
  assert offline == []  # a manual download needs no network check

  os.makedirs(manual)
  open(os.path.join(manual, 'ILSVRC2012_img_val.tar'), 'w').close()
  rc, _, err = run(capsys, '--dataset=imagenet2012', f'--data_dir={data_dir}',
                   f'--tf_venv={no_tf}')
  assert rc == 1 and f'{manual} lacks ILSVRC2012_img_train.tar.' in err

  open(os.path.join(manual, 'ILSVRC2012_img_train.tar'), 'w').close()
  handed = []
  monkeypatch.setattr(prepare, 'hand_off', lambda *a: handed.append(a[1:]) or 0)
  rc, _, _ = run(capsys, '--dataset=imagenet2012', f'--data_dir={data_dir}')
  assert rc == 0
  assert handed == [(data_dir, manual, os.path.join(data_dir, 'downloads'))]
  assert not os.path.exists(os.path.join(data_dir, 'imagenet2012'))


def test_hand_off_to_the_tf_venv(tmp_path, capsys, monkeypatch, no_tf):
  monkeypatch.setattr(prepare, 'unreachable', lambda urls, timeout: [])
  # No TF venv and no --install_tf_venv: say which command installs it.
  rc, _, err = run(capsys, '--dataset=cifar10', f'--data_dir={tmp_path}', f'--tf_venv={no_tf}')
  assert rc == 1
  assert f'`make data DATASET=cifar10 DATA_DIR={tmp_path}`' in err
  assert 'requirements-data.txt' in err
  # With one: this file runs as a script under its python, with resolved arguments.
  venv = tmp_path / 'venv'
  (venv / 'bin').mkdir(parents=True)
  (venv / 'bin' / 'python').write_text('')
  (venv / 'bin' / 'python').chmod(0o755)
  calls = []
  monkeypatch.setattr(subprocess, 'call', lambda cmd: calls.append(cmd) or 7)
  rc, out, _ = run(capsys, '--dataset=cifar10', f'--data_dir={tmp_path}', f'--tf_venv={venv}')
  assert rc == 7  # the child's exit code
  [cmd] = calls
  assert cmd[:2] == [str(venv / 'bin' / 'python'), os.path.abspath(prepare.__file__)]
  assert '--dataset=cifar10' in cmd and f'--data_dir={tmp_path}' in cmd
  assert f'--manual_dir={tmp_path}/downloads/manual' in cmd
  assert 'with TensorFlow' in out


def test_ensure_tf_venv_installs_once_per_requirements(tmp_path, monkeypatch):
  req = tmp_path / 'requirements-data.txt'
  req.write_text('tensorflow-cpu==2.21.0\n')
  venv = tmp_path / 'venv'
  calls = []

  def fake_check_call(cmd):
    calls.append(cmd[1:4])
    if cmd[1:3] == ['-m', 'venv']:
      (venv / 'bin').mkdir(parents=True)
      (venv / 'bin' / 'python').write_text('')
      (venv / 'bin' / 'python').chmod(0o755)

  monkeypatch.setattr(subprocess, 'check_call', fake_check_call)
  py = prepare.ensure_tf_venv(str(venv), str(req))
  assert py == str(venv / 'bin' / 'python')
  assert [c[:2] for c in calls] == [['-m', 'venv'], ['-m', 'pip'], ['-m', 'pip']]
  calls.clear()
  prepare.ensure_tf_venv(str(venv), str(req))
  assert calls == []  # stamp matches: nothing to do
  req.write_text('tensorflow-cpu==2.21.0\npillow==13.0.0\n')
  prepare.ensure_tf_venv(str(venv), str(req))
  assert [c[:2] for c in calls] == [['-m', 'pip'], ['-m', 'pip']]  # reinstall, no new venv


def test_requirements_data_pins_the_same_tfds():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  pins = lambda f: {line.split('#')[0].strip() for line in open(os.path.join(root, f))}
  main, data = pins('requirements.txt'), pins('requirements-data.txt')
  assert 'tensorflow-datasets==4.9.10' in main & data
  assert any(p.startswith('tensorflow-cpu==') for p in data)
  assert not any(p.startswith(('tensorflow==', 'tensorflow-cpu')) for p in main)
