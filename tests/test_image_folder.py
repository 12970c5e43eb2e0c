"""The image-folder converter (tools/image_folder, run from a checkout) on small generated trees."""

import concurrent.futures.process
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from puma_jax.datasets import DataError, prepare, splits
from tools import image_folder
from tools.image_folder import conversion, shards

ROOT = Path(__file__).resolve().parents[1]
NAME = 'tiny21k'
R = 8
# Class -> (width, height) of its images; n04 is left out by the classes file.
TREE = {
  'n01': [(40, 24), (24, 40), (33, 33), (50, 20)],
  'n02': [(30, 18), (18, 30), (25, 20)],
  'n03': [(21, 35), (35, 21), (16, 16)],
  'n04': [(20, 20), (30, 20)],
}
KEPT = ('n01', 'n02', 'n03')


def _write_tree(root: Path) -> tuple[Path, Path]:
  """A folder of class folders: JPEGs, one PNG with alpha, one grey JPEG, one corrupt file,
  one non-image file; and a classes file keeping n01-n03."""
  rng = np.random.default_rng(0)
  src = root / 'src'
  for cls, sizes in TREE.items():
    (src / cls).mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
      pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      if cls == 'n02' and i == 0:
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        Image.fromarray(np.concatenate([pixels, alpha], -1), 'RGBA').save(src / cls / f'{i}.png')
      elif cls == 'n02' and i == 1:
        Image.fromarray(pixels[..., 0], 'L').save(src / cls / f'{cls}_{i}.JPEG', quality=95)
      else:
        Image.fromarray(pixels).save(src / cls / f'{cls}_{i}.JPEG', quality=95)
  # A JPEG cut short: Pillow reads its header but cannot decode it.
  good = (src / 'n01' / 'n01_0.JPEG').read_bytes()
  (src / 'n01' / 'n01_9_corrupt.JPEG').write_bytes(good[: len(good) // 3])
  (src / 'n01' / 'notes.txt').write_text('not an image')
  classes = root / 'classes.txt'
  classes.write_text('# the kept classes\nn03\nn01\nn02  # grey and PNG\n')
  return src, classes


def _settings(classes: Path, **overrides) -> image_folder.Settings:
  kw = dict(
    resolution=R,
    classes_file=str(classes),
    test_per_class=1,
    train_shards=3,
    test_shards=2,
    jpeg_draft=False,
  )
  return image_folder.Settings(**{**kw, **overrides})


def _reference(path: Path, r: int, draft: bool = False) -> np.ndarray:
  """Pillow's own resize of the shorter side to r, then the centre r x r crop."""
  with Image.open(path) as im:
    if draft and im.format == 'JPEG':
      w, h = im.size
      im.draft('RGB', (int(np.ceil(w * 2 * r / min(w, h))), int(np.ceil(h * 2 * r / min(w, h)))))
    im = im.convert('RGB')
  w, h = im.size
  nw, nh = max(r, round(w * r / min(w, h))), max(r, round(h * r / min(w, h)))
  im = im.resize((nw, nh), Image.Resampling.BOX)
  left, top = (nw - r) // 2, (nh - r) // 2
  return np.asarray(im.crop((left, top, left + r, top + r)))


def _records(ddir: Path, split: str) -> list[dict]:
  source = splits.open_split(ddir, split, source_id=0).data_source
  return [source[i] for i in range(len(source))]


def _same_dataset(a: Path, b: Path) -> None:
  """Same records (decoded: protobuf map order differs between processes), shard lengths,
  labels and file lists."""
  info_a, info_b = (json.loads((d / 'dataset_info.json').read_text()) for d in (a, b))
  assert [s['shardLengths'] for s in info_a['splits']] == [
    s['shardLengths'] for s in info_b['splits']
  ]
  for split in ('train', 'test'):
    for suffix in ('.labels.npy', '.files.txt'):
      assert (a / f'{NAME}-{split}{suffix}').read_bytes() == (
        b / f'{NAME}-{split}{suffix}'
      ).read_bytes()
    for x, y in zip(_records(a, split), _records(b, split), strict=True):
      assert x.keys() == y.keys() and x['label'] == y['label']
      assert x['source_index'] == y['source_index']
      np.testing.assert_array_equal(x['image'], y['image'])
  assert (a / 'label.labels.txt').read_text() == (b / 'label.labels.txt').read_text()
  assert json.loads((a / 'corrupt_images.json').read_text())[0]['path'] == 'n01/n01_9_corrupt.JPEG'
  assert not list(a.glob('*.tmp-*')) and not (a / '_shards').exists()


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  return _write_tree(tmp_path_factory.mktemp('tree'))


@pytest.fixture(scope='module')
def reference(tree, tmp_path_factory):
  """An uninterrupted single-process conversion of `tree`."""
  src, classes = tree
  data_dir = tmp_path_factory.mktemp('reference')
  out = image_folder.convert(src, data_dir, NAME, _settings(classes), workers=0)
  return out


def test_conversion_opens_through_prepare_and_tfds_with_the_right_pixels(tree, reference):
  src, _ = tree
  data_dir = reference.parents[1]
  assert reference == data_dir / NAME / '1.0.0'
  cfg = _data_config(data_dir)
  p = prepare(cfg, data_dir)
  assert p.generated is None and p.built == ()
  assert p.real_train.class_names == KEPT and p.real_train.num_classes == 3
  assert p.real_train.image_shape == (R, R, 3)
  # 11 images in the kept classes, 1 per class in test, the corrupt one skipped.
  assert p.real_train.num_examples + p.real_test.num_examples == 10
  assert p.real_test.num_examples in (2, 3)
  sources = tfds.data_source(NAME, data_dir=os.fspath(data_dir))
  seen = []
  for split, s in (('train', p.real_train), ('test', p.real_test)):
    files = (reference / f'{NAME}-{split}.files.txt').read_text().splitlines()
    records = _records(reference, split)
    assert len(files) == len(records) == s.num_examples == len(sources[split])
    assert s.labels_path.exists()  # Written by the converter, not decoded on first use.
    np.testing.assert_array_equal(s.labels(), [r['label'] for r in records])
    for rel, rec, tf_rec in zip(
      files, records, [sources[split][i] for i in range(len(files))], strict=True
    ):
      assert rec['label'] == KEPT.index(rel.split('/')[0])
      np.testing.assert_array_equal(rec['image'], _reference(src / rel, R))
      np.testing.assert_array_equal(tf_rec['image'], rec['image'])
      seen.append(rel)
  assert len(set(seen)) == 10 and not any(r.startswith('n04/') for r in seen)
  # source_index: the position in the sorted listing of the kept classes.
  listing = sorted(f'{c}/{f.name}' for c in KEPT for f in (src / c).iterdir() if f.suffix != '.txt')
  for split in ('train', 'test'):
    files = (reference / f'{NAME}-{split}.files.txt').read_text().splitlines()
    assert [listing[r['source_index']] for r in _records(reference, split)] == files
  corrupt = json.loads((reference / 'corrupt_images.json').read_text())
  assert [c['path'] for c in corrupt] == ['n01/n01_9_corrupt.JPEG'] and corrupt[0]['reason']
  stats = json.loads((reference / 'conversion.json').read_text())['stats']
  assert stats['corrupt_images'] == 1 and stats['ignored_files_examples'] == ['n01/notes.txt']
  assert not (data_dir / f'{NAME}.incomplete').exists()


def _data_config(data_dir: Path):
  spec = importlib.util.spec_from_file_location('default_config', ROOT / 'configs' / 'default.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config('tiny').data
  cfg.data_dir = os.fspath(data_dir)
  cfg.real.kind = 'image_folder'
  cfg.real.name = NAME
  cfg.generated.kind = 'none'
  return cfg


def test_rerun_reuses_and_other_settings_are_refused(tree, reference):
  src, classes = tree
  data_dir = reference.parents[1]
  before = {p.name: p.stat().st_mtime_ns for p in reference.iterdir()}
  assert image_folder.convert(src, data_dir, NAME, _settings(classes), workers=0) == reference
  assert {p.name: p.stat().st_mtime_ns for p in reference.iterdir()} == before
  with pytest.raises(DataError, match=r'other settings \(resolution: 8 then, 16 now\)'):
    image_folder.convert(src, data_dir, NAME, _settings(classes, resolution=16), workers=0)


def test_jpeg_draft_is_close_to_a_full_decode(tmp_path):
  rng = np.random.default_rng(1)
  y, x = np.mgrid[0:120, 0:160] / 9.0
  smooth = np.stack([np.sin(x * a) * np.cos(y * b) for a, b in rng.uniform(0.2, 1.0, (3, 2))], -1)
  path = tmp_path / 'a.JPEG'
  Image.fromarray((127 + 120 * smooth).astype(np.uint8)).save(path, quality=95)
  with Image.open(path) as im:
    assert im.draft('RGB', (32, 24)) is not None  # Pillow can decode it at 1/4 scale.
  full = image_folder.load_image(path, R, jpeg_draft=False)
  fast = image_folder.load_image(path, R, jpeg_draft=True)
  np.testing.assert_array_equal(full, _reference(path, R))
  np.testing.assert_array_equal(fast, _reference(path, R, draft=True))
  assert np.abs(fast.astype(int) - full).mean() < 4.0


def _kill_after(num_written: int, monkeypatch):
  """Makes the k+1-th shard write fail, as if the process died there."""
  real = shards.write_shard
  calls = []

  def write(task):
    if len(calls) == num_written:
      raise KeyboardInterrupt('injected failure')
    calls.append(task.path.name)
    return real(task)

  monkeypatch.setattr(shards, 'write_shard', write)
  return calls


def test_interrupted_conversion_resumes_to_the_same_dataset(tree, reference, tmp_path, monkeypatch):
  src, classes = tree
  data_dir = tmp_path / 'data'
  calls = _kill_after(2, monkeypatch)
  with pytest.raises(KeyboardInterrupt):
    image_folder.convert(src, data_dir, NAME, _settings(classes), workers=0)
  work = image_folder.incomplete_dir(data_dir, NAME)
  assert not (data_dir / NAME).exists()  # No dataset until every shard is written.
  done = [work / n for n in calls]
  assert all(p.exists() for p in done) and len(list((work / '_shards').iterdir())) == 2
  # What a kill leaves besides: a temporary file, and a shard renamed before its meta file.
  (work / f'.{NAME}-train.tmp-123-0123abcd.array_record-00002-of-00003').write_bytes(b'partial')
  half = work / f'{NAME}-test.array_record-00000-of-00002'
  half.write_bytes(b'renamed, but no meta file')
  ids = {p.name: p.stat().st_ino for p in done}
  monkeypatch.undo()
  with pytest.raises(DataError, match='interrupted conversion with other settings.*resolution'):
    image_folder.convert(src, data_dir, NAME, _settings(classes, resolution=4), workers=0)
  out = image_folder.convert(src, data_dir, NAME, _settings(classes), workers=0)
  _same_dataset(out, reference)
  # The completed shards were kept, not written again.
  assert {n: (out / n).stat().st_ino for n in ids} == ids
  assert not work.parent.exists()


def test_a_damaged_complete_shard_is_written_again(tree, reference, tmp_path, monkeypatch):
  src, classes = tree
  data_dir = tmp_path / 'data'
  _kill_after(3, monkeypatch)
  with pytest.raises(KeyboardInterrupt):
    image_folder.convert(src, data_dir, NAME, _settings(classes), workers=0)
  monkeypatch.undo()
  work = image_folder.incomplete_dir(data_dir, NAME)
  damaged = work / f'{NAME}-train.array_record-00001-of-00003'
  damaged.write_bytes(damaged.read_bytes()[:-10])  # Truncated after it was recorded.
  rewritten = []
  real = shards.write_shard
  monkeypatch.setattr(shards, 'write_shard', lambda t: rewritten.append(t.path.name) or real(t))
  out = image_folder.convert(src, data_dir, NAME, _settings(classes), workers=0)
  assert sorted(rewritten) == sorted(
    [damaged.name] + [f'{NAME}-test.array_record-0000{k}-of-00002' for k in (0, 1)]
  )
  _same_dataset(out, reference)


def test_two_processes_share_the_work(tree, reference, tmp_path):
  src, classes = tree
  data_dir = tmp_path / 'data'
  s = _settings(classes)
  assert image_folder.convert(src, data_dir, NAME, s, workers=0, process_count=2) is None
  work = image_folder.incomplete_dir(data_dir, NAME)
  # Process 0 wrote tasks 0, 2, 4 of [train 0-2, test 0-1].
  assert sorted(p.name for p in (work / '_shards').iterdir()) == [
    'test-00001.npz',
    'train-00000.npz',
    'train-00002.npz',
  ]
  assert not (data_dir / NAME).exists()
  out = image_folder.convert(src, data_dir, NAME, s, workers=0, process_index=1, process_count=2)
  _same_dataset(out, reference)


def _env():
  return {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}


def test_command_line_with_a_worker_pool(tree, reference, tmp_path):
  src, classes = tree
  args = [
    f'--src={src}',
    f'--data_dir={tmp_path / "data"}',
    f'--name={NAME}',
    f'--resolution={R}',
    f'--classes_file={classes}',
    '--test_per_class=1',
    '--train_shards=3',
    '--test_shards=2',
    '--nojpeg_draft',
    '--workers=2',
  ]
  cmd = [sys.executable, '-m', 'tools.image_folder', *args]
  proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'--config.data.real.name={NAME}' in proc.stdout
  assert 'n01_9_corrupt.JPEG' in proc.stderr  # Logged.
  _same_dataset(tmp_path / 'data' / NAME / '1.0.0', reference)
  bad = subprocess.run(
    [*cmd[:3], f'--src={tmp_path / "nowhere"}', f'--data_dir={tmp_path / "other"}', *args[2:]],
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode == 1 and 'nowhere: no such folder' in bad.stderr


def test_conversion_killed_by_sigkill_resumes(tree, reference, tmp_path):
  src, classes = tree
  data_dir = tmp_path / 'data'
  script = f"""
import time
from tools import image_folder
from tools.image_folder import shards
load = shards.load_image
def slow(*args, **kwargs):
  time.sleep(0.3)
  return load(*args, **kwargs)
shards.load_image = slow
s = image_folder.Settings(resolution={R}, classes_file={str(classes)!r}, test_per_class=1,
                          train_shards=3, test_shards=2, jpeg_draft=False)
image_folder.convert({str(src)!r}, {str(data_dir)!r}, {NAME!r}, s, workers=0)
"""
  proc = subprocess.Popen([sys.executable, '-c', script], env=_env())
  metas = image_folder.incomplete_dir(data_dir, NAME) / '_shards'
  deadline = time.time() + 120
  while not (metas.exists() and any(p.suffix == '.npz' for p in metas.iterdir())):
    assert proc.poll() is None, 'the conversion ended before it could be killed'
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (data_dir / NAME).exists()
  out = image_folder.convert(src, data_dir, NAME, _settings(classes), workers=0)
  _same_dataset(out, reference)


def test_test_split_by_fraction_is_stable_when_files_are_added(tmp_path):
  src = tmp_path / 'src'
  for c in ('a', 'b'):
    (src / c).mkdir(parents=True)
    for i in range(40):
      (src / c / f'{i}.jpg').write_bytes(b'')
  s = image_folder.Settings(test_fraction=0.25)

  def test_files(settings):
    plan = image_folder.make_plan(image_folder.list_source(src, settings), settings, NAME)
    return set(plan.listing.relpaths(plan.order['test'])), plan

  before, plan = test_files(s)
  assert 10 <= len(before) <= 30  # About a quarter of 80.
  assert len(plan.order['train']) + len(plan.order['test']) == 80
  for i in range(40, 60):
    (src / 'a' / f'{i}.jpg').write_bytes(b'')
  after, _ = test_files(s)
  assert before <= after and all(p.startswith('a/') for p in after - before)
  other, _ = test_files(image_folder.Settings(test_fraction=0.25, split_seed=1))
  assert other != after
  # A fixed number per class instead: the 3 smallest hashes, the same on a second listing.
  t3 = image_folder.Settings(test_per_class=3)
  files, plan = test_files(t3)
  assert plan.spec['images_per_class']['test'] == [3, 3] and files == test_files(t3)[0]
  # The order mixes classes (a hash of the path), not class by class.
  labels = plan.listing.class_of(plan.order['train'])
  assert 0 < labels[:20].sum() < 20


def _sized_tree(root: Path, sizes: dict[str, int]) -> Path:
  for c, n in sizes.items():
    (root / c).mkdir(parents=True)
    for i in range(n):
      (root / c / f'{c}_{i}.JPEG').write_bytes(b'')
  return root


@pytest.mark.parametrize(
  'selection, kwargs, expected',
  [
    ('first', {}, ('c0', 'c1')),
    ('largest', {}, ('c2', 'c4')),
    ('first', {'min_images_per_class': 2}, ('c1', 'c2')),
    ('largest', {'min_images_per_class': 9}, None),
  ],
)
def test_class_selection(tmp_path, selection, kwargs, expected):
  src = _sized_tree(tmp_path, {'c0': 1, 'c1': 2, 'c2': 5, 'c3': 3, 'c4': 5})
  s = image_folder.Settings(num_classes=2, class_selection=selection, **kwargs)
  if expected is None:
    with pytest.raises(DataError, match='no class folder has at least'):
      image_folder.list_source(src, s)
    return
  listing = image_folder.list_source(src, s)
  assert listing.classes == expected
  assert listing.dropped == (['c0'] if kwargs.get('min_images_per_class') == 2 else [])


def test_random_class_selection_depends_on_the_seed_only(tmp_path):
  src = _sized_tree(tmp_path, {f'c{i:02d}': 1 for i in range(30)})

  def pick(seed):
    s = image_folder.Settings(num_classes=5, class_selection='random', class_seed=seed)
    return image_folder.list_source(src, s).classes

  assert pick(0) == pick(0) and len(set(pick(0))) == 5 and pick(0) == tuple(sorted(pick(0)))
  assert pick(0) != pick(1)


def test_bad_sources_give_clear_errors(tmp_path):
  s = image_folder.Settings()
  with pytest.raises(DataError, match='no such folder'):
    image_folder.list_source(tmp_path / 'missing', s)
  (tmp_path / 'file').write_text('x')
  with pytest.raises(DataError, match='is a file'):
    image_folder.list_source(tmp_path / 'file', s)
  tars = tmp_path / 'tars'
  tars.mkdir()
  (tars / 'n01440764.tar').write_bytes(b'')
  with pytest.raises(DataError, match=r'1 \.tar archives (?s:.*) tar -xf'):
    image_folder.list_source(tars, s)
  (tars / 'n01440764.tar').unlink()
  with pytest.raises(DataError, match='has no subfolders'):
    image_folder.list_source(tars, s)
  src = _sized_tree(tmp_path / 'src', {'a': 2, 'b': 0})
  (src / 'b' / 'readme.txt').write_text('x')
  with pytest.raises(
    DataError,
    match=r'b: class folder has no images \(only 1 other.*readme.txt.*--min_images_per_class=1',
  ):
    image_folder.list_source(src, s)
  assert image_folder.list_source(src, image_folder.Settings(min_images_per_class=1)).classes == (
    'a',
  )
  (src / 'a' / 'a_0.JPEG').unlink()
  (src / 'a' / 'a_1.JPEG').unlink()
  with pytest.raises(DataError, match='no images in any of the 2 class folders'):
    image_folder.list_source(src, s)
  listed = tmp_path / 'classes.txt'
  listed.write_text('a\nzz\n')
  with pytest.raises(DataError, match=r"1 of its 2 classes have no folder .*\['zz'\]"):
    image_folder.list_source(src, image_folder.Settings(classes_file=str(listed)))
  (src / 'a' / 'a_0.JPEG').write_bytes(b'')
  listed.write_text('a\n')
  with pytest.raises(DataError, match=r'a: 1 images .* fewer than 2; remove it from the list'):
    image_folder.list_source(
      src, image_folder.Settings(classes_file=str(listed), min_images_per_class=2)
    )
  listed.write_text('a\na\n')
  with pytest.raises(DataError, match='listed more than once'):
    image_folder.list_source(src, image_folder.Settings(classes_file=str(listed)))


@pytest.mark.parametrize(
  'kwargs, match',
  [
    ({'resolution': 0}, '--resolution=0'),
    ({'resample': 'nearest'}, '--resample'),
    ({'test_per_class': 0}, 'needs a test split'),
    ({'test_fraction': 1.0, 'test_per_class': 0}, r'--test_fraction=1.0: must be in \[0, 1\)'),
    ({'num_classes': 3, 'classes_file': 'x.txt'}, 'use one of them'),
    ({'class_selection': 'smallest'}, '--class_selection'),
  ],
)
def test_bad_settings_name_the_flag(tmp_path, kwargs, match):
  with pytest.raises(DataError, match=match):
    image_folder.convert(tmp_path, tmp_path / 'data', NAME, image_folder.Settings(**kwargs))


def test_bad_name_and_processes_name_the_flag(tmp_path):
  with pytest.raises(DataError, match='--name=.*a letter followed by'):
    image_folder.convert(tmp_path, tmp_path, 'imagenet-21k', image_folder.Settings())
  with pytest.raises(DataError, match='--process_index=2 --process_count=2'):
    image_folder.convert(tmp_path, tmp_path, NAME, process_index=2, process_count=2)


def test_too_many_shards_or_empty_test_split(tmp_path):
  src = _sized_tree(tmp_path / 'src', {'a': 3, 'b': 2})
  settings = image_folder.Settings(test_per_class=1, test_shards=3)
  with pytest.raises(DataError, match='--test_shards=3: the test split has only 2 images'):
    image_folder.make_plan(image_folder.list_source(src, settings), settings, NAME)
  one = _sized_tree(tmp_path / 'one', {'a': 1})
  settings = image_folder.Settings(test_per_class=1)
  with pytest.raises(DataError, match='test split would be empty'):
    image_folder.make_plan(image_folder.list_source(one, settings), settings, NAME)


def test_mostly_undecodable_shard_stops_the_conversion(tmp_path):
  src = tmp_path / 'src'
  (src / 'a').mkdir(parents=True)
  for i in range(40):
    (src / 'a' / f'{i}.JPEG').write_bytes(b'not a jpeg')
  with pytest.raises(DataError, match='failed to decode .*not a few corrupt files'):
    settings = image_folder.Settings(test_per_class=1, train_shards=1)
    image_folder.convert(src, tmp_path / 'data', NAME, settings, workers=0)


def test_missing_pillow_says_how_to_install_it(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'PIL', None)
  with pytest.raises(DataError, match=r"pip install -e '\.\[imagenet\]'"):
    image_folder.convert(tmp_path, tmp_path / 'data', NAME, image_folder.Settings())


def test_a_worker_that_dies_stops_the_conversion():
  # A worker killed by the OS (e.g. out of memory) must fail the run, not hang it.
  with pytest.raises(concurrent.futures.process.BrokenProcessPool):
    list(conversion._pool_map(os._exit, iter([3, 3, 3]), 1))
