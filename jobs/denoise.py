"""Bulk denoising job: the `n2n denoise` command as a script for Ray clusters.

    # on a cluster started from cluster.yaml (runs on the head node):
    ray submit cluster.yaml jobs/denoise.py -- s3://bucket/photos /mnt/shared/denoised \
        --model run/ckpt.n2n --address auto
    # as a Ray job, shipping this checkout (the job finds the cluster through RAY_ADDRESS):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/denoise.py photos/ out/ --model run/ckpt.n2n
    # locally (starts a local Ray):
    python jobs/denoise.py photos/ out/ --model run/ckpt.n2n --compare 4

Options are those of `n2n denoise --help`; the output folder must be reachable by every
node (a shared mount) when running on several machines.
"""
from pipeline.commands.denoise import denoise

if __name__ == "__main__":
    denoise()
