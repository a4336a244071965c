"""A private local Ray for tests: never an existing cluster of the machine, no dashboard."""
import ray


def private_ray(**options):
    """Generator for a pytest fixture: `yield from private_ray(num_cpus=2)`; always shut down.

    Yields the `ray` module. `options` go to `ray.init` (num_cpus, num_gpus, log_to_driver...).
    """
    ray.init(address="local", include_dashboard=False, **options)
    try:
        yield ray
    finally:
        ray.shutdown()
