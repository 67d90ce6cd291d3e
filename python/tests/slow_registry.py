"""A tiny registry on loopback that serves one image whose layer trickles
out slowly: a pull from it stays in flight long enough to interrupt it."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
import time
from typing import Any


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class SlowRegistry:
    """Serves ``127.0.0.1:PORT/slow/image:latest``; the layer blob is sent
    CHUNK bytes every DELAY seconds. ``layer_aborted`` is set when the
    client drops the layer download."""

    def __init__(self, layer_size: int = 4 << 20, chunk: int = 16 << 10, delay: float = 0.05):
        self.layer = os.urandom(layer_size)
        self.config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [_digest(self.layer)]},
                "config": {"Cmd": ["sh"]},
            }
        ).encode()
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": _digest(self.config),
                    "size": len(self.config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": _digest(self.layer),
                        "size": len(self.layer),
                    }
                ],
            }
        ).encode()
        self.chunk = chunk
        self.delay = delay
        self.layer_started = threading.Event()
        self.layer_aborted = threading.Event()
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str, head: bool) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if status == 200:
                    self.send_header("Docker-Content-Digest", _digest(body))
                self.send_header("Docker-Distribution-API-Version", "registry/2.0")
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _route(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("/v2", "/v2/"):
                    self._send(200, b"{}", "application/json", head)
                elif path.startswith("/v2/slow/image/manifests/"):
                    self._send(
                        200, registry.manifest, "application/vnd.oci.image.manifest.v1+json", head
                    )
                elif path == f"/v2/slow/image/blobs/{_digest(registry.config)}":
                    self._send(200, registry.config, "application/octet-stream", head)
                elif path == f"/v2/slow/image/blobs/{_digest(registry.layer)}":
                    self._trickle(head)
                else:
                    self._send(404, b'{"errors":[{"code":"NOT_FOUND"}]}', "application/json", head)

            def _trickle(self, head: bool) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(registry.layer)))
                self.send_header("Docker-Content-Digest", _digest(registry.layer))
                self.end_headers()
                if head:
                    return
                registry.layer_started.set()
                try:
                    for i in range(0, len(registry.layer), registry.chunk):
                        self.wfile.write(registry.layer[i : i + registry.chunk])
                        self.wfile.flush()
                        time.sleep(registry.delay)
                except OSError:
                    registry.layer_aborted.set()
                    self.close_connection = True

            def do_GET(self) -> None:
                self._route(False)

            def do_HEAD(self) -> None:
                self._route(True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        self.ref = f"{self.addr}/slow/image:latest"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
