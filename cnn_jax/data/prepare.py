"""Prepares one dataset into a tfds data dir as array_record files: `make data`.

    make data DATASET=NAME [DATA_DIR=DIR]
    python -m cnn_jax.data.prepare --dataset=NAME [--data_dir=DIR] [--install_tf_venv]

Afterwards ``cnn_jax.data.get_source(NAME, split, data_dir=DIR)`` (and
``--config.dataset=NAME --config.data_dir=DIR``) reads it with ``tfds.data_source``.
DIR defaults to $TFDS_DATA_DIR, else ~/tensorflow_datasets.

* Embedded datasets (``digits``, ``mnist1d``, ``plants``; see ``embedded.py``) are generated offline
  in this interpreter; they need nothing beyond requirements.txt.
* Catalog datasets (``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``,
  ``imagenet2012``, ``oxford_iiit_pet``, ... also ``name/config:version``) are built
  with the tfds builder's ``download_and_prepare(file_format='array_record')``.
  Encoding their Image features needs TensorFlow, which is kept out of the main venv
  (about 2 GB, and its pins must never constrain jax's): when this interpreter has no
  TensorFlow, the
  build runs in a separate venv (default ``.venv-data``, from requirements-data.txt)
  that ``--install_tf_venv`` (what ``make data`` passes) creates on first use.

Everything that can fail cheaply is checked first, in this interpreter, before any
install or download, and fails within seconds with a message that says what to do:
an unknown name (with close matches), a dataset already prepared (reported, exit 0,
left untouched), a version tfds cannot generate, a missing manual download (ImageNet:
the tars in DIR/downloads/manual), and download hosts that cannot be reached (a plain
socket connect with a few seconds' timeout, instead of tfds' minutes of retries).

A prepared dataset is never deleted, overwritten or modified: anything already in the
version folder (``DIR/NAME[/CONFIG]/VERSION``) is reported and left alone.

This module imports only the standard library at import time (tfds and TensorFlow are
imported inside the functions that need them), so it runs as a plain script in the
TensorFlow venv, where the rest of cnn_jax (jax, grain) is not installed.
"""
from __future__ import annotations

import argparse
import difflib
import glob
import hashlib
import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from typing import NamedTuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_TF_VENV = os.path.join(REPO_ROOT, '.venv-data')
TF_REQUIREMENTS = os.path.join(REPO_ROOT, 'requirements-data.txt')
CHECK_TIMEOUT_S = 3.0
# Catalog datasets the messages name as examples.
CATALOG_EXAMPLES = ('mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012',
                    'oxford_iiit_pet')
# Files a manual-download dataset needs in its manual dir (required, optional). Other
# manual datasets get their builder's MANUAL_DOWNLOAD_INSTRUCTIONS.
MANUAL_FILES = {
    'imagenet2012': (('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'),
                     ('ILSVRC2012_img_test.tar',)),
}


class PrepareError(Exception):
  """A dataset cannot be prepared here; the message says why and what to do."""


def make_command(name: str, data_dir: str | None = None, extra: str = '') -> str:
  cmd = f'make data DATASET={name}'
  if data_dir:
    cmd += f' DATA_DIR={data_dir}'
  if extra:
    cmd += f' PREPARE_ARGS={extra}'
  return cmd


def usage_lines(name: str, data_dir: str) -> str:
  return (f'Use it with: --config.dataset={name} --config.data_dir={data_dir}\n'
          f"  or in Python: cnn_jax.data.get_source('{name}', 'train', "
          f"data_dir='{data_dir}')")


# ---------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------

def split_name(name: str) -> tuple[str, str | None, str | None]:
  """'cifar10/cfg:1.0.0' -> ('cifar10', 'cfg', '1.0.0'); missing parts are None."""
  base, _, version = name.partition(':')
  base, _, config = base.partition('/')
  return base, (config or None), (version or None)


def embedded_builders() -> dict:
  """Name -> builder class of the embedded datasets; {} where cnn_jax is not importable
  (run as a script in the TensorFlow venv, which only builds catalog datasets)."""
  try:
    from cnn_jax.data import embedded
  except ImportError:
    return {}
  return dict(embedded.BUILDERS)


def catalog_names(exclude=()) -> list[str]:
  """tfds' registered dataset names (offline, milliseconds; no community datasets),
  less `exclude` (the embedded builders register themselves with tfds too)."""
  import tensorflow_datasets as tfds
  return sorted(set(tfds.list_builders(with_community_datasets=False)) - set(exclude))


def unknown_name_error(name: str, embedded_names, catalog,
                       without_tf: bool = False) -> PrepareError:
  base = split_name(name)[0]
  close = difflib.get_close_matches(base, list(embedded_names) + list(catalog), n=5,
                                    cutoff=0.6)
  hint = f' Did you mean: {", ".join(close)}?' if close else ''
  tf_note = (
      '\n  Without TensorFlow tfds does not list the ~200 datasets whose builders import '
      'it (mostly text, RL and video, e.g. glue, ucf101); to prepare one of those, add '
      'PREPARE_ARGS=--tf_builder.') if without_tf else ''
  return PrepareError(
      f'Unknown dataset {name!r}.{hint}\n'
      f'  Embedded (offline, generated here): {", ".join(embedded_names) or "-"}\n'
      f'  Catalog (tensorflow-datasets, {len(catalog)} names), e.g. '
      f'{", ".join(CATALOG_EXAMPLES)}; a config or version is written NAME/CONFIG:VERSION.\n'
      f'  All names: python -m cnn_jax.data.prepare --list{tf_note}')


class CatalogTarget(NamedTuple):
  version_dir: str            # DATA_DIR/NAME[/CONFIG]/VERSION, where tfds writes it
  version: str
  generable: frozenset        # versions this tfds can generate (not only read)
  urls: tuple                 # the download URLs tfds registered checksums for
  manual_instructions: str    # non-empty for manual-download datasets


def resolve_catalog(name: str, data_dir: str) -> CatalogTarget:
  """Where tfds would put catalog dataset `name` under data_dir, and how it is fetched,
  from the builder class alone (offline, no TensorFlow, nothing on disk is read)."""
  import tensorflow_datasets as tfds
  base, config, version = split_name(name)
  cls = tfds.builder_cls(base)
  configs = {c.name: c for c in (cls.BUILDER_CONFIGS or [])}
  parts = [data_dir, base]
  cfg = None
  if config and not configs:
    raise PrepareError(f'{base!r} has no configs, so {name!r} names none.')
  if configs:
    cname = config or getattr(cls, 'DEFAULT_BUILDER_CONFIG_NAME', None) or next(iter(configs))
    if cname not in configs:
      raise PrepareError(f'{base!r} has no config {cname!r}; its configs: '
                         f'{", ".join(configs)}.')
    cfg = configs[cname]
    parts.append(cname)
  # As tfds' DatasetBuilder.canonical_version / .supported_versions, independently.
  canonical = (cfg.version if cfg is not None and cfg.version else None) or cls.VERSION
  supported = ((cfg.supported_versions if cfg is not None else None)
               or cls.SUPPORTED_VERSIONS or [])
  as_version = lambda v: v if isinstance(v, tfds.core.Version) else tfds.core.Version(v)
  try:
    canonical = as_version(canonical)
    known = [canonical] + [as_version(v) for v in supported]
  except (TypeError, ValueError) as e:  # e.g. an abstract builder with no version
    raise PrepareError(f'{name!r} cannot be prepared as named (no version: {e}).') from e
  version = version or str(canonical)
  if version not in {str(v) for v in known}:
    raise PrepareError(f'{base!r} has no version {version!r}; tfds knows '
                       f'{", ".join(str(v) for v in known)}.')
  parts.append(version)
  return CatalogTarget(
      version_dir=os.path.join(*parts), version=version,
      generable=frozenset({str(canonical), str(max(known))}),
      urls=tuple(sorted(cls.url_infos or {})),
      manual_instructions=textwrap.dedent(
          getattr(cls, 'MANUAL_DOWNLOAD_INSTRUCTIONS', '') or '').strip())


# ---------------------------------------------------------------------------------------
# What is already on disk (filesystem only)
# ---------------------------------------------------------------------------------------

def existing_state(version_dir: str) -> str:
  """'absent', 'array_record' (ready), 'other_format' (prepared, unreadable by
  tfds.data_source) or 'no_info' (the folder exists but holds no dataset_info.json)."""
  if not os.path.exists(version_dir):
    return 'absent'
  if not os.path.isfile(os.path.join(version_dir, 'dataset_info.json')):
    return 'no_info'
  if glob.glob(os.path.join(glob.escape(version_dir), '*.array_record*')):
    return 'array_record'
  return 'other_format'


def stale_incomplete_dirs(version_dir: str) -> list[str]:
  """Leftovers of an interrupted tfds build (tfds writes to incomplete.XXXXXX_VERSION
  and renames it when done)."""
  parent, version = os.path.split(os.path.normpath(version_dir))
  return sorted(glob.glob(os.path.join(glob.escape(parent), f'incomplete.*_{version}')))


def check_existing(name: str, version_dir: str, data_dir: str) -> bool:
  """True if already prepared as array_record; raises if something else is in the way;
  False if there is nothing yet."""
  state = existing_state(version_dir)
  if state == 'array_record':
    return True
  if state == 'other_format':
    raise PrepareError(
        f'{name!r} is already prepared in {version_dir}, but not as array_record files, '
        f'which tfds.data_source needs (it was probably written as tfrecord by '
        f'tfds.load). It is left untouched. Either prepare it into another data dir '
        f'(`{make_command(name, "OTHER_DIR")}`), or move {version_dir} aside and run '
        f'`{make_command(name, data_dir)}` again.')
  if state == 'no_info':
    raise PrepareError(
        f'{version_dir} exists but holds no dataset_info.json, so it is not a complete '
        f'tfds dataset (an interrupted copy?), and tfds would silently reuse it. It is '
        f'left untouched: move it aside (or finish copying it) and run '
        f'`{make_command(name, data_dir)}` again.')
  return False


# ---------------------------------------------------------------------------------------
# Network reachability (a plain socket connect, bounded in time)
# ---------------------------------------------------------------------------------------

def probe_target(url: str) -> tuple[str, int, str]:
  """(host, port, what) to connect to for downloading url: the url's own host, or the
  proxy the environment names for it (requests, which tfds uses, honours the same)."""
  parts = urllib.parse.urlsplit(url)
  host = parts.hostname or ''
  port = parts.port or (443 if parts.scheme == 'https' else 80)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(host):
    p = urllib.parse.urlsplit(proxy if '://' in proxy else 'http://' + proxy)
    return p.hostname or '', p.port or 80, f'proxy {p.hostname}:{p.port or 80} for {host}'
  return host, port, f'{host}:{port}'


def unreachable(urls, timeout: float = CHECK_TIMEOUT_S) -> list[tuple[str, str]]:
  """[(what, reason)] for the download targets of urls that cannot be connected to.

  All targets are probed at once in daemon threads, so the whole check takes at most
  about `timeout` seconds even where name resolution hangs."""
  targets = {}
  for url in urls:
    host, port, what = probe_target(url)
    targets[(host, port)] = what
  results: dict = {}

  def probe(host, port):
    try:
      with socket.create_connection((host, port), timeout=timeout):
        results[(host, port)] = None
    except OSError as e:
      results[(host, port)] = str(e) or type(e).__name__

  threads = [threading.Thread(target=probe, args=hp, daemon=True) for hp in targets]
  for t in threads:
    t.start()
  deadline = time.monotonic() + timeout + 0.5
  for t in threads:
    t.join(max(0.0, deadline - time.monotonic()))
  out = []
  for hp, what in targets.items():
    if hp not in results:
      out.append((what, f'no answer within {timeout:g} s'))
    elif results[hp] is not None:
      out.append((what, results[hp]))
  return out


def check_network(name: str, urls, data_dir: str, download_dir: str, timeout: float,
                  embedded_names) -> None:
  bad = unreachable(urls, timeout)
  if not bad:
    return
  lines = '\n'.join(f'  - {what}: {reason}' for what, reason in bad)
  some = sorted(urls)[0]
  raise PrepareError(
      f'Cannot download {name!r}: its download hosts are unreachable from this machine '
      f'(a connect with a {timeout:g} s timeout; e.g. {some}):\n{lines}\n'
      f'It is not downloaded here (tfds would retry for minutes). Instead:\n'
      f'  * on a machine with network run `{make_command(name, "DIR")}`, then copy '
      f'DIR/{split_name(name)[0]} into {data_dir} here (it must hold *.array_record* '
      f'files and dataset_info.json, as `make data` writes them);\n'
      f'  * or, if the downloaded archives are already in {download_dir}, run '
      f'`{make_command(name, data_dir, "--skip_network_check")}`;\n'
      f'  * or train on an embedded offline dataset: {", ".join(embedded_names) or "digits, mnist1d"}.')


# ---------------------------------------------------------------------------------------
# Manual downloads (ImageNet and others)
# ---------------------------------------------------------------------------------------

def check_manual(name: str, instructions: str, manual_dir: str, data_dir: str) -> None:
  """Raises unless the manual-download files are in manual_dir."""
  base = split_name(name)[0]
  if base in MANUAL_FILES:
    required, optional = MANUAL_FILES[base]
    missing = [f for f in required if not os.path.isfile(os.path.join(manual_dir, f))]
    if not missing:
      return
    where = ('does not exist' if not os.path.isdir(manual_dir) else
             f'lacks {", ".join(missing)}')
    files = '\n'.join(f'  {os.path.join(manual_dir, f)}' for f in required)
    opt = '\n'.join(f'  {os.path.join(manual_dir, f)}   (optional)' for f in optional)
    raise PrepareError(
        f'{name!r} is a manual download and {manual_dir} {where}. Put these files there '
        f'(as downloaded, not extracted):\n{files}\n{opt}\n'
        f'{instructions}\n'
        f'then run `{make_command(name, data_dir)}` again (or add '
        f'PREPARE_ARGS=--manual_dir=DIR where the files are elsewhere).')
  if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
    raise PrepareError(
        f'{name!r} is a manual download and {manual_dir} is missing or empty. '
        f'tfds says:\n{instructions}\nPut the files in {manual_dir} (or pass '
        f'PREPARE_ARGS=--manual_dir=DIR) and run `{make_command(name, data_dir)}` again.')


# ---------------------------------------------------------------------------------------
# The TensorFlow venv
# ---------------------------------------------------------------------------------------

def tf_available() -> bool:
  """Whether this interpreter can import TensorFlow (found, not imported)."""
  return importlib.util.find_spec('tensorflow') is not None


def venv_python(venv: str) -> str:
  return os.path.join(venv, 'bin', 'python')


def ensure_tf_venv(venv: str, requirements: str = TF_REQUIREMENTS) -> str:
  """Creates (or updates, when requirements changed) the venv; returns its python."""
  py = venv_python(venv)
  stamp = os.path.join(venv, '.installed')
  with open(requirements, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  if os.access(py, os.X_OK) and os.path.isfile(stamp):
    with open(stamp) as f:
      if f.read().strip() == digest:
        return py
  print(f'Installing {os.path.basename(requirements)} into {venv} (TensorFlow, '
        f'about 2 GB, once) ...', flush=True)
  if not os.access(py, os.X_OK):
    subprocess.check_call([sys.executable, '-m', 'venv', venv])
  subprocess.check_call([py, '-m', 'pip', 'install', '--quiet', '--upgrade', 'pip'])
  subprocess.check_call([py, '-m', 'pip', 'install', '--quiet', '-r', requirements])
  with open(stamp, 'w') as f:
    f.write(digest + '\n')
  return py


def hand_off(args, data_dir: str, manual_dir: str, download_dir: str) -> int:
  """Runs this file as a script under the TensorFlow venv's python; returns its code."""
  py = venv_python(args.tf_venv)
  if os.path.abspath(sys.prefix) == os.path.abspath(args.tf_venv):
    raise PrepareError(
        f'TensorFlow is not importable in {args.tf_venv}, the venv meant to have it. '
        f'Reinstall it: rm -rf {args.tf_venv} && {make_command(args.dataset, data_dir)}')
  if args.install_tf_venv:
    try:
      py = ensure_tf_venv(args.tf_venv)
    except (OSError, subprocess.CalledProcessError) as e:
      raise PrepareError(
          f'Could not install {TF_REQUIREMENTS} into {args.tf_venv}: {e}. The package '
          f'index must be reachable for this one-time install.') from e
  elif not os.access(py, os.X_OK):
    raise PrepareError(
        f'Preparing {args.dataset!r} needs TensorFlow to encode its features, and this '
        f'Python ({sys.executable}) has none (it is kept out of the main venv). Run '
        f'`{make_command(args.dataset, data_dir)}`, which installs it into '
        f'{args.tf_venv} from requirements-data.txt, or pass --install_tf_venv.')
  cmd = [py, os.path.abspath(__file__), f'--dataset={args.dataset}',
         f'--data_dir={data_dir}', f'--download_dir={download_dir}',
         f'--manual_dir={manual_dir}', f'--check_timeout={args.check_timeout}',
         f'--tf_venv={args.tf_venv}']
  cmd += [f for f in ('--skip_network_check', '--tf_builder') if getattr(args, f[2:])]
  print(f'Building {args.dataset!r} with TensorFlow in {args.tf_venv} ...', flush=True)
  return subprocess.call(cmd)


# ---------------------------------------------------------------------------------------
# Preparing
# ---------------------------------------------------------------------------------------

def prepare_embedded_dataset(name: str, builder_cls, data_dir: str) -> str:
  """Generates an embedded dataset (offline). Returns a one-line report."""
  # From the class: constructing a builder reads whatever is in its version folder.
  version_dir = os.path.join(data_dir, name, str(builder_cls.VERSION))
  if check_existing(name, version_dir, data_dir):
    return f'{name!r} is already prepared in {version_dir}; left untouched.'
  from cnn_jax.data.sources import prepare_embedded
  prepare_embedded(name, data_dir)
  if existing_state(version_dir) != 'array_record':
    raise PrepareError(f'Preparing {name!r} wrote no array_record files in {version_dir}.')
  return f'Prepared {name!r} in {version_dir} (array_record, generated offline).'


def missing_package_error(name: str, e: ImportError) -> PrepareError:
  missing = getattr(e, 'name', None) or getattr(e.__cause__, 'name', None) or 'PACKAGE'
  return PrepareError(
      f'The tfds builder of {name!r} needs a package this venv lacks ({e}). Install '
      f'it with `{sys.executable} -m pip install {missing}` and run again.')


def build_catalog(name: str, data_dir: str, download_dir: str, manual_dir: str) -> str:
  """download_and_prepare as array_record. Needs TensorFlow and the download hosts."""
  importlib.import_module('tensorflow')  # fail here, clearly, if the TF install is broken
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare(
        download_dir=download_dir, file_format='array_record',
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except ModuleNotFoundError as e:  # some builders need extra packages (pandas, h5py, ...)
    raise missing_package_error(name, e) from e
  version_dir = os.fspath(builder.data_dir)
  if existing_state(version_dir) != 'array_record':
    raise PrepareError(f'tfds finished but {version_dir} holds no array_record files.')
  return f'Prepared {name!r} in {version_dir} (array_record).'


def prepare(args) -> int:
  """Checks, then prepares (or hands off to the TensorFlow venv). Raises PrepareError."""
  name = args.dataset
  data_dir = os.path.abspath(os.path.expanduser(args.data_dir or _default_data_dir()))
  download_dir = os.path.abspath(os.path.expanduser(
      args.download_dir or os.path.join(data_dir, 'downloads')))
  manual_dir = os.path.abspath(os.path.expanduser(
      args.manual_dir or os.path.join(download_dir, 'manual')))
  embedded = embedded_builders()
  base = split_name(name)[0]

  if base in embedded:
    print(prepare_embedded_dataset(base, embedded[base], data_dir))
    print(usage_lines(base, data_dir))
    return 0

  catalog = catalog_names(exclude=embedded)
  if base not in catalog:
    if tf_available():
      raise unknown_name_error(name, sorted(embedded), catalog)
    # Builders that import TensorFlow are registered only where it is installed.
    if not (args.tf_builder or os.access(venv_python(args.tf_venv), os.X_OK)):
      raise unknown_name_error(name, sorted(embedded), catalog, without_tf=True)
    print(f'Note: {name!r} is not a tfds builder that loads without TensorFlow; looking '
          f'for it in {args.tf_venv}.', file=sys.stderr)
    return hand_off(args, data_dir, manual_dir, download_dir)
  # Everything below up to the build reads the builder *class* only: constructing some
  # builders already needs TensorFlow (or reads whatever is in the version folder).
  try:
    target = resolve_catalog(name, data_dir)
  except ImportError as e:  # the builder's module imports TensorFlow, pandas, h5py, ...
    if tf_available():
      raise missing_package_error(name, e) from e
    print(f'Note: the tfds builder of {name!r} cannot even be inspected without '
          f'{getattr(e, "name", None) or e}; all checks run in {args.tf_venv}.',
          file=sys.stderr)
    return hand_off(args, data_dir, manual_dir, download_dir)
  version_dir = target.version_dir
  if check_existing(name, version_dir, data_dir):
    print(f'{name!r} is already prepared in {version_dir}; left untouched.')
    print(usage_lines(name, data_dir))
    return 0
  if target.version not in target.generable:
    raise PrepareError(
        f'{name!r}: this tensorflow-datasets can generate {base} only at version(s) '
        f'{", ".join(sorted(target.generable))}, not {target.version}; older versions '
        f'can only be read where they were already prepared.')
  for d in stale_incomplete_dirs(version_dir):
    print(f'Note: {d} is left over from an interrupted build; it is not used and can be '
          f'deleted.', file=sys.stderr)

  if target.manual_instructions:
    check_manual(name, target.manual_instructions, manual_dir, data_dir)
  elif args.skip_network_check:
    pass
  elif target.urls:
    check_network(name, target.urls, data_dir, download_dir, args.check_timeout,
                  sorted(embedded))
  else:
    print(f'Note: tfds lists no download URLs for {name!r}, so their reachability is '
          f'not checked; without network tfds retries for minutes.', file=sys.stderr)

  if not tf_available():
    return hand_off(args, data_dir, manual_dir, download_dir)
  print(build_catalog(name, data_dir, download_dir, manual_dir))
  print(usage_lines(name, data_dir))
  return 0


def _default_data_dir() -> str:
  try:
    from cnn_jax.data.sources import default_data_dir
  except ImportError:  # run as a script in the TensorFlow venv: the same rule
    return os.path.expanduser(
        os.environ.get('TFDS_DATA_DIR') or os.path.join('~', 'tensorflow_datasets'))
  return default_data_dir()


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      prog='python -m cnn_jax.data.prepare',
      description='Prepare one dataset as array_record files in a tfds data dir.')
  p.add_argument('--dataset', help='embedded (digits, mnist1d, plants) or tfds catalog name, '
                 'e.g. mnist, cifar10, imagenet2012, NAME/CONFIG:VERSION')
  p.add_argument('--data_dir', default=None,
                 help='tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)')
  p.add_argument('--download_dir', default=None, help='default: DATA_DIR/downloads')
  p.add_argument('--manual_dir', default=None,
                 help='manual downloads, e.g. ImageNet tars (default: DOWNLOAD_DIR/manual)')
  p.add_argument('--check_timeout', type=float, default=CHECK_TIMEOUT_S,
                 help='seconds for the download-host reachability check')
  p.add_argument('--skip_network_check', action='store_true',
                 help='build even if the download hosts look unreachable')
  p.add_argument('--tf_venv', default=DEFAULT_TF_VENV,
                 help='venv with TensorFlow for catalog builds (default: .venv-data)')
  p.add_argument('--install_tf_venv', action='store_true',
                 help='create/update --tf_venv from requirements-data.txt if needed')
  p.add_argument('--tf_builder', action='store_true',
                 help='the tfds builder imports TensorFlow (text, RL, video datasets): '
                 'do all checks in --tf_venv')
  p.add_argument('--list', action='store_true', help='print the known dataset names')
  args = p.parse_args(argv)
  if not args.list and not args.dataset:
    p.error('--dataset is required (e.g. --dataset=mnist), or --list')
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.list:
    print('Embedded (offline):', ', '.join(sorted(embedded_builders())) or '-')
    print('Catalog (tensorflow-datasets):')
    print(textwrap.fill(', '.join(catalog_names(exclude=embedded_builders())), width=88))
    return 0
  try:
    return prepare(args)
  except PrepareError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
