"""Products summed over many rows, split into one batch entry per CPU thread.

A weight gradient is a^T @ b for a (M, K) and b (M, O) with a long M (pixels) and small K
and O (channels): its (K, O) output is too small for the GEMM library to split between
threads, and over M, the one long dimension, it does not split. Measured on a 2-core CPU,
(4096, 44)^T @ (4096, 48) runs 1.3x faster at two threads than at one, the narrow
(4096, 3)^T @ (4096, 48) slower. Cut into P parts of M and run as one batched product
(P, K, m) @ (P, m, O) -> (P, K, O), torch gives every thread its own parts: the same rows as
a batch of two ran 2.0-2.4x faster at two threads. The P partial sums are added at the end.

P = `parts(t)`: the number of intra-op threads on a CPU, 1 on other devices (a GPU's GEMMs
fill it without this), and 1 for a single thread, where everything below is the plain product.
"""
from __future__ import annotations

import torch
from torch import Tensor


def parts(t: Tensor) -> int:
    """How many parts sums over rows of tensors on t's device split into (see the module's docstring)."""
    return torch.get_num_threads() if t.device.type == "cpu" else 1


def add_tn_(acc: Tensor, a: Tensor, b: Tensor, transposed: bool = False) -> Tensor:
    """acc (P, K, O) += the P parts of a^T @ b, for a (M, K), b (M, O) (any strides); with
    `transposed`, acc (P, O, K) += the parts of b^T @ a (the faster orientation for a narrow b).

    Rows [i m, (i+1) m) go to part i (m = M // P); the last M mod P rows to part 0. The sum of acc
    over its first dimension is the whole product. Returns acc.
    """
    P = acc.shape[0]
    M = a.shape[0]
    if P == 1:
        return _addmm_tn(acc[0], a, b, transposed)
    m = M // P
    if m:
        if transposed:
            acc.baddbmm_(_parts(b, P, m, transpose=True), _parts(a, P, m))
        else:
            acc.baddbmm_(_parts(a, P, m, transpose=True), _parts(b, P, m))
    if P * m < M:
        _addmm_tn(acc[0], a[P * m:], b[P * m:], transposed)
    return acc


def _parts(x: Tensor, P: int, m: int, transpose: bool = False) -> Tensor:
    """The first P m rows of x (M, K), any strides, as the view (P, m, K), or (P, K, m) with `transpose`:
    one call where slicing, unflattening and transposing would be three (this runs once per tap and block)."""
    row, col = x.stride()
    if transpose:
        return x.as_strided((P, x.shape[1], m), (m * row, col, row), x.storage_offset())
    return x.as_strided((P, m, x.shape[1]), (m * row, row, col), x.storage_offset())


def _addmm_tn(acc: Tensor, a: Tensor, b: Tensor, transposed: bool) -> Tensor:
    return acc.addmm_(b.t(), a) if transposed else acc.addmm_(a.t(), b)


def add_column_sums_(acc: Tensor, b: Tensor, ones: Tensor) -> Tensor:
    """acc (P, O) += the P parts of the sum over the rows of b (M, O), split as in `add_tn_`;
    `ones` holds at least M // P ones (at least M when P is 1)."""
    P = acc.shape[0]
    M = b.shape[0]
    if P == 1:
        acc[0].addmv_(b.t(), ones[:M])
        return acc
    m = M // P
    if m:
        acc.unsqueeze(1).baddbmm_(ones[:m].expand(P, 1, m), _parts(b, P, m))
    if P * m < M:
        acc[0] += b[P * m:].sum(0)
    return acc


def tn(a: Tensor, b: Tensor, transposed: bool = False) -> Tensor:
    """a^T @ b (K, O) for a (M, K), b (M, O), split over rows across threads; with `transposed`,
    b^T @ a (O, K)."""
    K, O = a.shape[1], b.shape[1]
    P = parts(a)
    if P == 1:
        return b.t() @ a if transposed else a.t() @ b
    acc = a.new_zeros(P, *((O, K) if transposed else (K, O)))
    return add_tn_(acc, a, b, transposed).sum(0)


def column_sums(b: Tensor) -> Tensor:
    """(M, O) -> (O,): the sum over rows, as vector-matrix products split over rows across threads
    (several times faster than sum(0) on a CPU)."""
    P = parts(b)
    if P == 1:
        return b.new_ones(b.shape[0]) @ b
    acc = b.new_zeros(P, b.shape[1])
    return add_column_sums_(acc, b, b.new_ones(b.shape[0] // P + 1)).sum(0)
