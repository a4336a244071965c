"""Train a Noise2Noise denoiser data-parallel on Ray: the `n2n train` command as a cluster job script.

A cluster entry point: without --address it attaches to the Ray cluster running on this
node (RAY_ADDRESS, else the cluster of the last `ray start` here; `--address discover`)
and prints one line naming it, or says that it started a private Ray when none runs.

On a cluster started from cluster.yaml (the project is installed on every node):

    ray up cluster.yaml
    ray submit cluster.yaml jobs/train.py -- --data s3://BUCKET/images --out s3://BUCKET/runs/a --steps 5000

With Ray's job API against any running cluster (the working directory is uploaded):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --data s3://BUCKET/images --out s3://BUCKET/runs/a --steps 5000

On one machine without a cluster (a private Ray is started in this process):

    python jobs/train.py --data images/ --out runs/a --workers 2 --steps 1000
    python jobs/train.py --data images/ --out runs/a --smoke-test

Options: `python jobs/train.py --help` (the same as `n2n train --help`).
"""
from pipeline.commands.train import train
from pipeline.runtime.ray_session import DISCOVER

if __name__ == "__main__":
    train(obj={"address": DISCOVER})
