"""Checksummed, resumable downloads against a local HTTP server (127.0.0.1, started here)."""

import hashlib
import socket

import numpy as np
import pytest
from download_server import serve

from puma_jax.datasets import DataError, download, prepared

CHUNK = 1000  # Small chunks so that a 20 kB file is streamed in many steps.


def _content(n: int = 20_000, seed: int = 0) -> bytes:
  return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def test_complete_download_is_verified_and_kept(tmp_path):
  data = _content()
  dest = tmp_path / 'data' / 'file.npz'
  with serve({'/f.npz': data}) as server:
    out = download.fetch(server.url('/f.npz'), dest, sha256=_sha(data), chunk_bytes=CHUNK)
    assert out == dest and dest.read_bytes() == data
    assert not download.part_path(dest).exists()
    # A second call finds the verified file and does not download again.
    download.fetch(server.url('/f.npz'), dest, sha256=_sha(data))
    assert len(server.requests) == 1


def test_a_cut_transfer_resumes_with_a_range_request(tmp_path):
  data = _content()
  dest = tmp_path / 'file.bin'
  with serve({'/f': data}) as server:
    server.cut_after, server.cuts_left = 7_000, 2  # Two responses end early.
    download.fetch(server.url('/f'), dest, sha256=_sha(data), chunk_bytes=CHUNK)
    ranges = [r for _, r in server.requests]
  assert dest.read_bytes() == data
  assert ranges == [None, 'bytes=7000-', 'bytes=14000-']


def test_a_part_file_left_by_an_earlier_run_is_resumed(tmp_path):
  data = _content()
  dest = tmp_path / 'file.bin'
  with serve({'/f': data}) as server:
    server.cut_after, server.cuts_left = 5_000, 10  # More cuts than one call retries.
    with pytest.raises(DataError, match='the next run resumes') as e:
      download.fetch(server.url('/f'), dest, sha256=_sha(data), chunk_bytes=CHUNK, retries=1)
    assert server.url('/f') in str(e.value)
    assert not dest.exists()
    assert download.part_path(dest).read_bytes() == data[:10_000]
    server.cuts_left = 0
    download.fetch(server.url('/f'), dest, sha256=_sha(data), chunk_bytes=CHUNK)
    assert server.requests[-1][1] == 'bytes=10000-'
  assert dest.read_bytes() == data


def test_wrong_checksum_is_a_clear_error_and_keeps_nothing(tmp_path):
  data = _content()
  dest = tmp_path / 'file.bin'
  wrong = _sha(b'another file')
  with serve({'/f': data}) as server:
    with pytest.raises(DataError) as e:
      download.fetch(server.url('/f'), dest, sha256=wrong, chunk_bytes=CHUNK)
  msg = str(e.value)
  assert f'sha256 {_sha(data)}, expected {wrong}' in msg and 'deleted' in msg
  assert server.url('/f') in msg
  assert list(tmp_path.iterdir()) == []  # Neither the file nor a .part is kept.


def test_a_wrong_file_in_place_is_refused_not_used(tmp_path):
  dest = tmp_path / 'file.bin'
  dest.write_bytes(b'not it')
  with pytest.raises(DataError, match='Delete it to download it again'):
    download.fetch('http://127.0.0.1:9/f', dest, sha256=_sha(b'the right one'))


def test_wrong_size_is_refused(tmp_path):
  data = _content()
  with serve({'/f': data}) as server:
    with pytest.raises(DataError, match=f'{len(data)} bytes, expected {len(data) + 1}'):
      download.fetch(server.url('/f'), tmp_path / 'f', sha256=_sha(data), size=len(data) + 1)
  assert list(tmp_path.iterdir()) == []


def _closed_port() -> int:
  s = socket.socket()
  s.bind(('127.0.0.1', 0))
  port = s.getsockname()[1]
  s.close()  # Nothing listens there now.
  return port


def test_unreachable_server_names_the_url_and_how_to_place_the_file(tmp_path):
  url = f'http://127.0.0.1:{_closed_port()}/cifar.tar.gz'
  dest = tmp_path / 'cifar.tar.gz'
  with pytest.raises(DataError) as e:
    download.fetch(url, dest, sha256=_sha(b'x'))
  msg = str(e.value)
  assert url in msg and f'place it at {dest}' in msg and 'refused' in msg.lower()
  assert list(tmp_path.iterdir()) == []


def test_http_error_is_a_clear_error(tmp_path):
  with serve({}) as server:
    with pytest.raises(DataError, match='HTTP 404') as e:
      download.fetch(server.url('/missing'), tmp_path / 'f', sha256=_sha(b'x'))
    assert server.url('/missing') in str(e.value)


def test_progress_is_logged_with_rate_and_eta(tmp_path):
  data = _content(3 << 20)
  lines = []
  with serve({'/f': data}) as server:
    download.fetch(server.url('/f'), tmp_path / 'f', sha256=_sha(data), log_fn=lines.append)
  assert lines and 'MiB/s' in lines[-1] and 'ETA' in lines[-1] and lines[-1].endswith('(done)')


def _data_config(**generated):
  from configs import default

  data = default.get_config('tiny').data
  data.real.num_shards = 2
  data.generated.num_shards = 2
  for k, v in generated.items():
    data.generated[k] = v
  return data


def test_prepare_downloads_a_generated_npz_named_by_url(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (50, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 50)
  np.savez(tmp_path / 'gen.npz', image=images, label=labels)
  data = (tmp_path / 'gen.npz').read_bytes()
  with serve({'/files/gen.npz': data}) as server:
    config = _data_config(kind='npz', url=server.url('/files/gen.npz'), sha256=_sha(data))
    p = prepared.prepare(config, tmp_path / 'data')
    # Rerunning reuses the built dataset: nothing is downloaded again.
    assert prepared.prepare(config, tmp_path / 'data').built == ()
    assert len(server.requests) == 1
  assert (tmp_path / 'data' / 'downloads' / 'gen.npz').read_bytes() == data
  np.testing.assert_array_equal(p.generated.labels(), labels)


def test_generated_url_needs_a_sha256(tmp_path):
  config = _data_config(kind='npz', url='http://127.0.0.1:9/gen.npz', sha256='')
  with pytest.raises(DataError, match='data.generated.url needs data.generated.sha256'):
    prepared.prepare(config, tmp_path / 'data')
