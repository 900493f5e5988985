"""kernels/mailbox.py under TRITON_INTERPRET=1: post appends a plan to the ring exactly as its reference
does (ring wrap-around included) and writes the host's head after it; wait passes once done reaches posted,
counts a timeout otherwise, and after a timeout counts every later wait at once without polling."""

from __future__ import annotations

import pytest
import torch

from kernels import mailbox


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("n", [1, 3, 40])
def test_post_matches_reference_and_wraps(n):
    g = torch.Generator().manual_seed(n)
    R, M = 4, 3
    ring, head, posted = torch.zeros(R, 2 * n + 3, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), \
        torch.zeros(M, dtype=torch.int64)
    ring_r, head_r, posted_r = ring.clone(), head.clone(), posted.clone()
    head_h, head_hr = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)  # the host's head
    for i in range(7):  # past the ring's end
        m = i % M
        src = torch.randint(-1, 128, (n,), generator=g, dtype=torch.int32)
        dst = torch.randint(0, 50, (n,), generator=g, dtype=torch.int32)
        flags = mailbox.FLAG_EARLY if i % 3 == 1 else 0
        mailbox.post(m, src, dst, ring, head, posted, head_host=head_h, flags=flags)
        mailbox.post_reference(m, src, dst, ring_r, head_r, posted_r, head_host=head_hr, flags=flags)
        assert torch.equal(ring, ring_r) and torch.equal(head, head_r) and torch.equal(posted, posted_r), i
        assert int(head_h) == int(head_hr) == i + 1
        e = ring[(i + 1) % R]
        assert int(e[0]) & 0xFFFFFFFF == m and int(e[0]) >> mailbox.FLAG_SHIFT == flags
        assert e[-1] == i + 1 and torch.equal(e[2 : 2 + n], src.long())


def test_post_refuses_a_ring_of_the_wrong_width():
    with pytest.raises(ValueError, match="flags"):
        mailbox.post(0, torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                     torch.zeros(4, 7, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                     torch.zeros(1, dtype=torch.int64), flags=2)
    with pytest.raises(ValueError, match="2n \\+ 3"):
        mailbox.post(0, torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                     torch.zeros(4, 6, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                     torch.zeros(1, dtype=torch.int64))


def test_wait_passes_times_out_and_then_fails_fast():
    done, posted = torch.tensor([3], dtype=torch.int64), torch.tensor([3], dtype=torch.int64)
    err = torch.zeros(1, dtype=torch.int32)
    mailbox.wait(done, posted, err, max_iters=5)
    assert err.item() == 0
    posted += 1  # a plan the copier never finishes
    mailbox.wait(done, posted, err, max_iters=5)
    assert err.item() == 1
    done += 1  # still one plan short
    posted += 1
    mailbox.wait(done, posted, err, max_iters=10**9)  # returns at once: no polling after a timeout
    assert err.item() == 2
