"""A session's history in blocks (workers/history.py) against a plain tensor of the same tokens:
chunks written across block boundaries read back the same (whole, by index, as key blocks),
growing never copies what is held, dropping pages frees the blocks they empty, and clone / export /
restore give the same tokens."""

from __future__ import annotations

import torch

from lessserve.workers.history import History

L, HKV, D, PAGE = 2, 3, 4, 4


def filled(tokens: int, chunk: int, seed: int = 0) -> tuple[History, torch.Tensor, torch.Tensor]:
    """A history fed `tokens` tokens in chunks of `chunk` (one layer at a time, as the engine writes),
    and the same K/V as plain tensors [L, Hkv, tokens, D]."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(L, HKV, tokens, D, generator=g), torch.randn(L, HKV, tokens, D, generator=g)
    h = History(L, HKV, D, torch.float32, PAGE)
    for a in range(0, tokens, chunk):
        c = min(chunk, tokens - a)
        h.reserve(c)
        for layer in range(L):
            h.write(a, k[layer, :, a : a + c], v[layer, :, a : a + c], layer)
        h.advance(c)
    return h, k, v


def test_chunks_across_blocks_read_back_whole_by_index_and_as_key_blocks():
    h, k, v = filled(3 * 64 + 10, chunk=37)
    assert len(h.blocks_k) == 4 and h.held == 202 and h.pages == 50
    got_k, got_v = h.tensors()
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    idx = torch.tensor([200, 3, 64, 63, 128, 0])
    rk, rv = h.rows(idx)
    assert torch.equal(rk, k[:, :, idx]) and torch.equal(rv, v[:, :, idx])
    blocks = h.key_blocks(50 * PAGE)
    assert all(b.shape[2] % PAGE == 0 for b in blocks)
    assert torch.equal(torch.cat(blocks, dim=2), k[:, :, : 50 * PAGE])


def test_growing_keeps_the_blocks_it_has_and_dropping_pages_frees_emptied_blocks():
    h, k, v = filled(100, chunk=9)
    first = h.blocks_k[0]
    h.reserve(500)
    assert h.blocks_k[0] is first and h.capacity >= h.held + 500  # nothing held was copied
    h, k, v = filled(200, chunk=50)
    h.drop_pages(17)  # 68 tokens: block 0 (64 tokens) is empty now
    assert h.base == 68 and len(h.blocks_k) == 3 and h.held == 132
    got_k, _ = h.tensors()
    assert torch.equal(got_k, k[:, :, 68:])
    assert torch.equal(h.rows(torch.tensor([0, 131]))[0], k[:, :, [68, 199]])
    h.reserve(10)
    for layer in range(L):  # appending after a drop lands where the held tokens end
        h.write(200, k[layer, :, :10], v[layer, :, :10], layer)
    h.advance(10)
    assert torch.equal(h.tensors()[0][:, :, -10:], k[:, :, :10])
    assert h.nbytes() == h.held * h.token_bytes() <= h.allocated_bytes()


def test_clone_export_and_restore_hold_the_same_tokens():
    h, k, v = filled(150, chunk=64)
    h.drop_pages(3)
    c = h.clone()
    assert c.blocks_k[0] is not h.blocks_k[0]
    tensors, meta = h.export()
    r = History.restore((L, HKV, D), torch.float32, tensors, meta)
    for other in (c, r):
        assert (other.base, other.n) == (12, 150)
        assert all(torch.equal(a, b) for a, b in zip(other.tensors(), (k[:, :, 12:], v[:, :, 12:]), strict=True))
