"""Search hyperparameters on Ray Tune, every trial an `n2n train` run: the `n2n sweep` command as a job script.

On a cluster started from cluster.yaml (the project is installed on every node; --out
must be a folder every node sees, e.g. a shared file system):

    ray up cluster.yaml
    ray submit cluster.yaml jobs/sweep.py -- --data s3://bucket/images --holdout 40 \
        --out /shared/sweeps/a --steps 2000 --grid width=16,32,48 --loguniform lr=1e-4:3e-3

It attaches to the Ray cluster running on its node (Ray's own discovery: RAY_ADDRESS, else
the cluster of the last `ray start` here), else starts a private Ray. On one machine:

    python jobs/sweep.py --data images/ --holdout 40 --out sweeps/a --steps 300 \
        --grid width=16,32 --grid lr=3e-4,1e-3 --cpus-per-trial 1
    python jobs/sweep.py --out sweeps/a --resume         # after an interruption
    python jobs/sweep.py --data images/ --out sweeps/smoke --smoke-test

Options: `python jobs/sweep.py --help` (the same as `n2n sweep --help`).
"""
from pipeline.commands.sweep import sweep
from pipeline.runtime.ray_session import DISCOVER

if __name__ == "__main__":
    sweep(obj={"address": DISCOVER})
