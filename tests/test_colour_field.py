"""The colour field's torch hash encoding: nerfstudio's values, reproducible gradients."""

from __future__ import annotations

import torch

from nerfstudio.field_components.encodings import HashEncoding

from certsdf_ns.method.field import OneGatherHashEncoding


def _pair():
    kwargs = dict(num_levels=6, min_res=4, max_res=128, log2_hashmap_size=12, features_per_level=2, implementation="torch")
    ours, theirs = OneGatherHashEncoding(**kwargs), HashEncoding(**kwargs)
    theirs.load_state_dict(ours.state_dict())  # same parameter layout: checkpoints load either way
    return ours, theirs


def test_one_gather_encoding_equals_nerfstudios_values_and_gradients() -> None:
    torch.manual_seed(0)
    ours, theirs = _pair()
    with torch.no_grad():
        ours.hash_table.normal_()
        theirs.hash_table.copy_(ours.hash_table)
    x = torch.rand(5000, 3)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-6)
    (out_ours**2).sum().backward()
    (out_theirs**2).sum().backward()
    torch.testing.assert_close(ours.hash_table.grad, theirs.hash_table.grad, rtol=1e-4, atol=1e-5)


def test_hash_table_gradient_is_bitwise_reproducible() -> None:
    """Many points per table row, the case where threaded scatter-adds reorder sums: two backward
    passes must give the same bits (bit-exact resume depends on it)."""
    torch.manual_seed(1)
    ours, _ = _pair()
    x = torch.rand(40_000, 3)
    grads = []
    for _ in range(3):
        ours.hash_table.grad = None
        (ours(x) ** 2).sum().backward()
        grads.append(ours.hash_table.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])
