"""Gradient buckets: contiguous pieces of the flat (P,) buffers, in the order backward finishes them.

The flat buffers (pipeline.training.flat) hold the parameters in `named_parameters()`
order, which for n2n's architectures is the order forward uses them; backward finishes
their gradients in the reverse order. A `BucketPlan` cuts the buffers at parameter
boundaries into about `count` buckets of similar size, numbered in the order backward
completes them: bucket 0 holds the last parameters (the output layers), the last bucket
the first ones. Every party of a run (driver, node reducers, workers) uses the same plan,
which the driver makes and hands out.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    """Parameters `params` (indices into the model's parameter list), at [lo, hi) of the flat buffers."""

    params: range
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class BucketPlan:
    """The buckets of a model, in backward order, and where each parameter lies."""

    buckets: tuple[Bucket, ...]
    size: int  # P, the flat buffers' length

    def __len__(self) -> int:
        return len(self.buckets)

    def bucket_of(self, param: int) -> int:
        """The index (in backward order) of the bucket that holds parameter `param`."""
        for index, bucket in enumerate(self.buckets):
            if param in bucket.params:
                return index
        raise IndexError(f"parameter {param} is in no bucket")

    def to_list(self) -> list[list[int]]:
        """[[first param, stop param, lo, hi], ...]: the plan as plain numbers (JSON, Ray calls)."""
        return [[b.params.start, b.params.stop, b.lo, b.hi] for b in self.buckets]

    @classmethod
    def from_list(cls, rows: list, size: int) -> "BucketPlan":
        return cls(tuple(Bucket(range(a, b), lo, hi) for a, b, lo, hi in rows), size)


def plan_buckets(sizes: list[int], count: int) -> BucketPlan:
    """Cut parameters of `sizes` (element counts, in flat order) into about `count` buckets.

    Walking back from the last parameter, a bucket closes once it holds at least
    P / count elements; a parameter is never split, so a model with few, large tensors
    gets fewer buckets. `count` = 1: one bucket, the whole buffer.
    """
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"plan_buckets: need positive parameter sizes, got {sizes}")
    if count < 1:
        raise ValueError(f"plan_buckets: count must be at least 1, got {count}")
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    total = offsets[-1]
    target = total / count
    buckets, stop = [], len(sizes)
    for first in range(len(sizes) - 1, -1, -1):
        held = offsets[stop] - offsets[first]
        if first == 0 or (held >= target and len(buckets) < count - 1):
            buckets.append(Bucket(range(first, stop), offsets[first], offsets[stop]))
            stop = first
    return BucketPlan(tuple(buckets), total)
