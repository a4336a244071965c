"""Sums over rows split across CPU threads (n2n_core/row_split.py), and the convolutions that use
them, at thread counts that do not divide the rows: the same results as the plain products."""
import contextlib
import dataclasses

import pytest
import torch

import n2n_core as n
from n2n_core import build_model, conv_plan, row_split
from n2n_core.conv import set_conv_plan
from pipeline.export.torch_twins import build_torch_model
from torch_oracle import check_against_torch

F64 = torch.float64


@contextlib.contextmanager
def threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("M,K,O", [(1, 4, 3), (2, 5, 20), (17, 27, 3), (101, 20, 44), (64, 16, 16)])
def test_products_and_sums_split_over_rows_equal_the_plain_ones(count, M, K, O):
    g = torch.Generator().manual_seed(M * K * O)
    a = torch.randn(M, 2 * K, dtype=F64, generator=g)[:, ::2]  # strided rows and columns
    b = torch.randn(M, O, dtype=F64, generator=g)
    with threads(count):
        assert row_split.parts(a) == count
        torch.testing.assert_close(row_split.tn(a, b), a.t() @ b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(row_split.tn(a, b, transposed=True), b.t() @ a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(row_split.column_sums(b), b.sum(0), rtol=1e-12, atol=1e-12)
        acc = torch.zeros(count, K, O, dtype=F64)
        row_split.add_tn_(acc, a, b)
        row_split.add_tn_(acc, a[: M // 2 + 1], b[: M // 2 + 1])  # accumulates
        torch.testing.assert_close(acc.sum(0), a.t() @ b + a[: M // 2 + 1].t() @ b[: M // 2 + 1],
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("cin,cout,args", [
    (16, 20, dict(kernel_size=3, padding=1)),
    (3, 18, dict(kernel_size=3, padding=1)),  # block columns
    (20, 3, dict(kernel_size=3, padding=1)),  # thin output: the transposed products
])
@pytest.mark.parametrize("block_rows", [7, 4096])
def test_tap_convolutions_at_several_threads_match_torch(count, cin, cout, args, block_rows):
    layer, twin = n.Conv2d(cin, cout, dtype=F64, **args), torch.nn.Conv2d(cin, cout, **args).double()
    layer.plan = dataclasses.replace(conv_plan.CPU_PLAN, tap_block_rows=block_rows)
    with threads(count):
        check_against_torch(layer, twin, torch.randn(2, cin, 9, 7, dtype=F64), label=f"{count} threads")


@pytest.mark.parametrize("count", [2, 3])
def test_a_unet_at_several_threads_matches_torch(count):
    kwargs = dict(depth=2, width=16, residual=True)
    model = build_model("unet", generator=torch.Generator().manual_seed(2), dtype=F64, **kwargs)
    set_conv_plan(model, dataclasses.replace(conv_plan.CPU_PLAN, tap_block_rows=13))
    twin = build_torch_model("unet", dtype=F64, **kwargs)
    with threads(count):
        check_against_torch(model, twin, torch.randn(2, 3, 12, 16, dtype=F64), label=f"{count} threads")
