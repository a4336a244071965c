"""A real S3 HTTP API on loopback for tests: moto's standalone server, as Ray's own tests use it.

`s3_server()` is a generator for a pytest fixture: it starts the server on 127.0.0.1 (a free
port), points this process's environment at it (the AWS_* variables that pyarrow reads, so
that any process started afterwards, Ray nodes included, inherits them), creates the bucket,
and on exit stops the server and restores the environment.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

BUCKET = "n2n-test"


@dataclass(frozen=True)
class S3:
    endpoint: str                # http://127.0.0.1:PORT
    fs: pafs.S3FileSystem        # a client of the server
    bucket: str = BUCKET

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

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


def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                               access_key="testing", secret_key="testing", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield S3(endpoint=endpoint, fs=fs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def s3_cluster(*, connect: bool):
    """A `ray.cluster_utils.Cluster` for the S3 tests: a head with no CPUs and two 2-CPU nodes,
    started after `s3_server` (the nodes inherit its environment); yields (cluster, nodes).
    `connect`: this process joins it (training); the bulk job connects by itself."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        nodes = [c.add_node(num_cpus=2) for _ in range(2)]
        c.wait_for_nodes()
        if connect:
            ray.init(address=c.address)
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
