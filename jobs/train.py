"""Train a Noise2Noise denoiser data-parallel on Ray: the `n2n train` command as a job script.

On a cluster started from cluster.yaml (the project is installed on every node):

    ray up cluster.yaml
    ray submit cluster.yaml jobs/train.py -- --data s3://bucket/images --out /tmp/run --steps 5000

With Ray's job API against any running cluster (the working directory is uploaded):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --data s3://bucket/images --out /tmp/run --steps 5000

On one machine (a local Ray is started in-process unless --address or RAY_ADDRESS is set):

    python jobs/train.py --data images/ --out runs/a --workers 2 --steps 1000
    python jobs/train.py --data images/ --out runs/a --smoke-test

Options: `python jobs/train.py --help` (the same as `n2n train --help`).
"""
from pipeline.commands.train import train

if __name__ == "__main__":
    train()
