"""A local HTTP file server for download tests: Range requests, and cuts on demand."""

import contextlib
import http.server
import re
import threading
from collections.abc import Iterator


class FileServer(http.server.ThreadingHTTPServer):
  """Serves `files` (path -> bytes) on 127.0.0.1 with `Range: bytes=a-` support.

  Attributes:
    files: URL path -> content.
    cut_after: while positive, each response is cut (connection closed) after
      this many body bytes; `cuts_left` responses are cut.
    requests: (path, Range header or None) of every request, in order.
  """

  daemon_threads = True

  def __init__(self, files: dict[str, bytes]):
    super().__init__(('127.0.0.1', 0), _Handler)
    self.files = dict(files)
    self.cut_after = 0
    self.cuts_left = 0
    self.requests: list[tuple[str, str | None]] = []

  def url(self, path: str) -> str:
    return f'http://127.0.0.1:{self.server_address[1]}{path}'


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'

  def log_message(self, *args):  # Quiet.
    pass

  def do_GET(self):  # noqa: N802 (http.server's name)
    server: FileServer = self.server
    rng = self.headers.get('Range')
    server.requests.append((self.path, rng))
    data = server.files.get(self.path)
    if data is None:
      self.send_error(404, 'Not Found')
      return
    start = 0
    if rng:
      m = re.fullmatch(r'bytes=(\d+)-', rng)
      start = int(m[1])
      if start >= len(data):
        self.send_response(416)
        self.send_header('Content-Range', f'bytes */{len(data)}')
        self.send_header('Content-Length', '0')
        self.end_headers()
        return
      self.send_response(206)
      self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
    else:
      self.send_response(200)
    body = data[start:]
    self.send_header('Content-Length', str(len(body)))
    self.send_header('Accept-Ranges', 'bytes')
    self.end_headers()
    if server.cuts_left > 0 and server.cut_after < len(body):
      server.cuts_left -= 1
      self.wfile.write(body[: server.cut_after])
      self.wfile.flush()
      self.close_connection = True
      return
    self.wfile.write(body)


@contextlib.contextmanager
def serve(files: dict[str, bytes]) -> Iterator[FileServer]:
  """Runs a `FileServer` in a thread for the duration of the block."""
  server = FileServer(files)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield server
  finally:
    server.shutdown()
    server.server_close()
    thread.join()
