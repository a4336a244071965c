"""Bulk denoising job: the `n2n denoise` command as a cluster job script.

A cluster entry point: without --address it attaches to the Ray cluster running on this
node (RAY_ADDRESS, else the cluster of the last `ray start` here; `--address discover`)
and prints one line naming it, or says that it started a private Ray when none runs.

    # on a cluster started from cluster.yaml (runs on the head node):
    ray submit cluster.yaml jobs/denoise.py -- s3://BUCKET/photos s3://BUCKET/denoised --model s3://BUCKET/runs/a/model.n2n
    # as a Ray job, shipping this checkout (the job finds the cluster through RAY_ADDRESS):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/denoise.py s3://BUCKET/photos s3://BUCKET/denoised --model s3://BUCKET/runs/a/model.n2n
    # on one machine without a cluster (a private Ray is started in this process):
    python jobs/denoise.py photos/ out/ --model runs/a/model.n2n --compare 4

Options are those of `n2n denoise --help`. On several machines IN, OUT and --model must
be reachable from every node: object storage URIs (s3://, gs://) or a shared mount.
"""
from pipeline.commands.denoise import denoise
from pipeline.runtime.ray_session import DISCOVER

if __name__ == "__main__":
    denoise(obj={"address": DISCOVER})
