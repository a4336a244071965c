"""Real object-store HTTP APIs on loopback for tests, reached through plain s3:// and gs:// URIs.

- `s3_server()`: moto's standalone S3 server, as Ray's own tests use it; the AWS_* variables
  that pyarrow reads point at it.
- `gcs_server()`: gcp-storage-emulator, a server of the Google Cloud Storage JSON API, with
  a stand-in for the GCE metadata server that hands out an access token: pyarrow's GCS
  client (google-cloud-cpp) takes its endpoint from CLOUD_STORAGE_EMULATOR_ENDPOINT and,
  with no other credentials, its token from the metadata server at GCE_METADATA_ROOT, as
  on a GCE node.

Each is a generator for a pytest fixture: it starts the server(s) on 127.0.0.1 (free ports),
points this process's environment at them (so that any process started afterwards, Ray
nodes included, inherits it), creates the bucket, and on exit stops them and restores the
environment.
"""
from __future__ import annotations

import json
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.fs as pafs

BUCKET = "n2n-test"


@dataclass(frozen=True)
class Bucket:
    endpoint: str                # http://127.0.0.1:PORT
    fs: pafs.FileSystem          # a client of the server
    bucket: str = BUCKET
    scheme: str = "s3"

    def uri(self, key: str) -> str:
        return f"{self.scheme}://{self.bucket}/{key}"

    def put_folder(self, folder: Path, key: str) -> str:
        """Upload every file under `folder` to `key/...`; returns the URI of `key`."""
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                with self.fs.open_output_stream(f"{self.bucket}/{key}/{path.relative_to(folder).as_posix()}") as f:
                    f.write(path.read_bytes())
        return self.uri(key)

    def keys(self, key: str) -> list[str]:
        """Every object under `key`, as keys relative to it, sorted."""
        selector = pafs.FileSelector(f"{self.bucket}/{key}", recursive=True, allow_not_found=True)
        root = f"{self.bucket}/{key}/"
        return sorted(i.path[len(root):] for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File)

    def read(self, key: str) -> bytes:
        with self.fs.open_input_stream(f"{self.bucket}/{key}") as f:
            return f.read()


@contextmanager
def _environment(env: dict):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        with _environment(env):
            fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                                   access_key="testing", secret_key="testing", allow_bucket_creation=True)
            fs.create_dir(BUCKET)
            yield Bucket(endpoint=endpoint, fs=fs)
    finally:
        server.stop()


class _MetadataServer(BaseHTTPRequestHandler):
    """The two answers of the GCE metadata server that google-cloud-cpp asks for: the default
    service account, and an access token for it (the emulator accepts any)."""

    def do_GET(self):
        if self.path.rstrip("/").endswith("/token"):
            body = {"access_token": "test-token", "expires_in": 3600, "token_type": "Bearer"}
        else:
            body = {"email": "n2n-test@example.com", "aliases": ["default"],
                    "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gcs_server():
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    metadata = ThreadingHTTPServer(("127.0.0.1", 0), _MetadataServer)
    threading.Thread(target=metadata.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{port}"
    metadata_host = f"127.0.0.1:{metadata.server_address[1]}"
    env = {"CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint, "GCE_METADATA_ROOT": metadata_host,
           "GCE_METADATA_HOST": metadata_host}
    try:
        with _environment(env):
            fs, _ = pafs.FileSystem.from_uri(f"gs://{BUCKET}")  # the client every gs:// URI gets
            yield Bucket(endpoint=endpoint, fs=fs, scheme="gs")
    finally:
        metadata.shutdown()
        metadata.server_close()
        server.stop()


def store_cluster(*, connect: bool):
    """A cluster for the object-store tests: a head with no CPUs and two 2-CPU nodes, started
    after `s3_server` or `gcs_server` (the nodes inherit its environment); yields (cluster, nodes).
    `connect`: this process joins it (training); the bulk job connects by itself."""
    from ray_support import worker_cluster

    yield from worker_cluster(node_cpus=2, connect=connect)
