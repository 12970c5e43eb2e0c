"""CIFAR-10/100 from hand-placed binary archives: small fake archives in a temp dir."""

import dataclasses
import hashlib
import importlib.util
import io
import socket
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from download_server import serve

from puma_jax.datasets import DataError, builders, cifar, prepared

ROOT = Path(__file__).resolve().parents[1]
PER_FILE = 3  # records per .bin file (the real files hold 10,000)


def _config(kind, archive_dir, *, download=False):
  spec = importlib.util.spec_from_file_location('default_config', ROOT / 'configs' / 'default.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  data = module.get_config('tiny').data
  data.real.kind = kind
  data.real.archive_dir = str(archive_dir)
  data.real.download = download  # Offline unless a test serves the archive itself.
  data.real.num_shards = 2
  data.generated.kind = 'none'
  return data


def _records(kind, n, seed):
  """Raw records, and the (images, labels) they must decode to."""
  a = cifar.ARCHIVES[kind]
  rng = np.random.default_rng(seed)
  planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)  # R, G, B planes
  fine = rng.integers(0, a.num_classes, n).astype(np.uint8)
  head = [fine[:, None]] if a.label_bytes == 1 else [(fine // 5)[:, None], fine[:, None]]
  raw = np.concatenate([*head, planes.reshape(n, -1)], axis=1).tobytes()
  return raw, planes.transpose(0, 2, 3, 1), fine.astype(np.int64)


def make_archive(directory: Path, kind: str, *, truncate: bool = False) -> dict:
  """Writes a small archive with the official layout; returns the expected splits."""
  a = cifar.ARCHIVES[kind]
  expected = {}
  members = {}
  for split, files in (('train', a.train_files), ('test', a.test_files)):
    parts = [_records(kind, PER_FILE, seed=zlib.crc32(f'{split}/{f}'.encode())) for f in files]
    for f, (raw, _, _) in zip(files, parts, strict=True):
      members[a.prefix + f] = raw
    expected[split] = (np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))
  names = [f'class_{i}' for i in range(a.num_classes)]
  members[a.prefix + a.names_file] = ('\n'.join(names) + '\n').encode()
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w:gz') as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  data = buf.getvalue()
  if truncate:
    data = data[: len(data) * 2 // 3]
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / a.filename
  path.write_bytes(data)
  expected['names'] = tuple(names)
  expected['checksum'] = (len(data), hashlib.sha256(data).hexdigest())
  return expected


@pytest.fixture
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('a network connection was attempted')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)


@pytest.mark.parametrize('kind', ['cifar10', 'cifar100'])
def test_cifar_archive_builds_in_archive_order(tmp_path, monkeypatch, no_network, kind):
  expected = make_archive(tmp_path / 'archives', kind)
  monkeypatch.setitem(cifar.EXPECTED_OVERRIDE, kind, expected['checksum'])
  p = prepared.prepare(_config(kind, tmp_path / 'archives'), tmp_path / 'data')
  assert p.generated is None
  assert p.real_train.name == f'puma_real/{kind}'
  assert p.real_train.class_names == expected['names']
  assert p.real_train.num_classes == cifar.ARCHIVES[kind].num_classes
  for split in (p.real_train, p.real_test):
    images, labels = expected[split.split]
    assert split.num_examples == len(labels) and split.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(split.labels(), labels)
    for i in range(split.num_examples):
      r = split.data_source[i]
      np.testing.assert_array_equal(r['image'], images[i])  # R, G, B planes -> HWC
      assert (r['label'], r['source_index']) == (labels[i], i)
  # Once built, the archive is no longer needed.
  (tmp_path / 'archives' / cifar.ARCHIVES[kind].filename).unlink()
  assert prepared.prepare(_config(kind, tmp_path / 'archives'), tmp_path / 'data').built == ()


@pytest.mark.parametrize('archive_dir', ['', 'archives'])
def test_missing_archive_is_downloaded_into_the_data_dir(tmp_path, monkeypatch, archive_dir):
  a = cifar.ARCHIVES['cifar10']
  expected = make_archive(tmp_path / 'served', 'cifar10')
  monkeypatch.setitem(cifar.EXPECTED_OVERRIDE, 'cifar10', expected['checksum'])
  with serve({'/cifar.tgz': (tmp_path / 'served' / a.filename).read_bytes()}) as server:
    monkeypatch.setitem(
      cifar.ARCHIVES, 'cifar10', dataclasses.replace(a, url=server.url('/cifar.tgz'))
    )
    folder = tmp_path / archive_dir if archive_dir else ''
    p = prepared.prepare(_config('cifar10', folder, download=True), tmp_path / 'data')
    assert len(server.requests) == 1
  np.testing.assert_array_equal(p.real_train.labels(), expected['train'][1])
  kept = (tmp_path / archive_dir if archive_dir else tmp_path / 'data' / 'downloads') / a.filename
  assert kept.read_bytes() == (tmp_path / 'served' / a.filename).read_bytes()


def test_processes_that_do_not_build_never_download(tmp_path, monkeypatch):
  # Processes other than 0 open what process 0 prepared (build=False) after the barrier.
  a = cifar.ARCHIVES['cifar10']
  expected = make_archive(tmp_path / 'served', 'cifar10')
  monkeypatch.setitem(cifar.EXPECTED_OVERRIDE, 'cifar10', expected['checksum'])
  with serve({'/c.tgz': (tmp_path / 'served' / a.filename).read_bytes()}) as server:
    monkeypatch.setitem(cifar.ARCHIVES, 'cifar10', dataclasses.replace(a, url=server.url('/c.tgz')))
    config = _config('cifar10', '', download=True)
    with pytest.raises(DataError, match='not prepared yet'):
      prepared.prepare(config, tmp_path / 'data', build=False)
    assert server.requests == []
    prepared.prepare(config, tmp_path / 'data')  # Process 0.
    assert prepared.prepare(config, tmp_path / 'data', build=False).built == ()
    assert len(server.requests) == 1


def test_unreachable_archive_url_says_how_to_place_it_by_hand(tmp_path, monkeypatch):
  a = cifar.ARCHIVES['cifar10']
  monkeypatch.setitem(cifar.EXPECTED_OVERRIDE, 'cifar10', cifar.expected_checksum('cifar10'))
  with serve({}) as server:  # Answers 404.
    url = server.url('/cifar.tgz')
    monkeypatch.setitem(cifar.ARCHIVES, 'cifar10', dataclasses.replace(a, url=url))
    with pytest.raises(DataError) as e:
      prepared.prepare(_config('cifar10', '', download=True), tmp_path / 'data')
  msg = str(e.value)
  for needle in (url, 'HTTP 404', 'data.real.archive_dir', 'data.real.download=False'):
    assert needle in msg
  assert not (tmp_path / 'data' / 'puma_real' / 'cifar10').exists()


def test_official_checksums_come_from_tfds():
  assert cifar.expected_checksum('cifar10') == (
    170052171,
    'c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd',
  )
  assert cifar.expected_checksum('cifar100')[0] == 168513733


@pytest.mark.parametrize('kind', ['cifar10', 'cifar100'])
def test_missing_archive_says_what_to_put_where(tmp_path, no_network, kind):
  a = cifar.ARCHIVES[kind]
  with pytest.raises(DataError) as e:
    prepared.prepare(_config(kind, tmp_path / 'archives'), tmp_path / 'data')
  msg = str(e.value)
  for needle in (a.filename, a.url, str(tmp_path / 'archives'), 'data.real.archive_dir'):
    assert needle in msg
  assert not (tmp_path / 'data' / 'puma_real' / kind).exists()


def test_no_archive_dir_names_the_field(tmp_path, no_network):
  with pytest.raises(DataError, match='needs data.real.archive_dir'):
    prepared.prepare(_config('cifar10', ''), tmp_path / 'data')


def test_wrong_archive_is_refused_by_checksum(tmp_path, no_network):
  make_archive(tmp_path / 'archives', 'cifar10')  # Not the official bytes.
  with pytest.raises(DataError, match='not the official cifar-10-binary.tar.gz') as e:
    prepared.prepare(_config('cifar10', tmp_path / 'archives'), tmp_path / 'data')
  assert 'sha256 c4a38c50' in str(e.value)
  assert not (tmp_path / 'data' / 'puma_real' / 'cifar10').exists()


def test_truncated_archive_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch, no_network):
  expected = make_archive(tmp_path / 'archives', 'cifar10', truncate=True)
  monkeypatch.setitem(cifar.EXPECTED_OVERRIDE, 'cifar10', expected['checksum'])
  with pytest.raises(DataError, match='truncated or corrupt') as e:
    prepared.prepare(_config('cifar10', tmp_path / 'archives'), tmp_path / 'data')
  assert 'cifar-10-binary.tar.gz' in str(e.value)
  assert not (tmp_path / 'data' / 'puma_real' / 'cifar10' / builders.VERSION).exists()


def test_archive_with_a_short_record_is_refused(tmp_path, monkeypatch):
  directory = tmp_path / 'archives'
  make_archive(directory, 'cifar10')
  path = directory / 'cifar-10-binary.tar.gz'
  # Rewrite with one byte missing from test_batch.bin.
  with tarfile.open(path, 'r:gz') as tar:
    members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
  members['cifar-10-batches-bin/test_batch.bin'] = members['cifar-10-batches-bin/test_batch.bin'][
    :-1
  ]
  with tarfile.open(path, 'w:gz') as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  monkeypatch.setitem(
    cifar.EXPECTED_OVERRIDE,
    'cifar10',
    (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()),
  )
  with pytest.raises(DataError, match='test_batch.bin has 9218 bytes'):
    prepared.prepare(_config('cifar10', directory), tmp_path / 'data')
