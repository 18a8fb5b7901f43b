"""Raw Triton kernels for evict-and-absorb, one program per (slot i, KV head h), no host round trip.

Merged order j in [0, total): the slot's L cached entries, then the chunk's C new ones.
  evict_select_kernel: priorities under the policy, the V = max(total - B, 0) victims picked by
    repeated argmin over unprotected entries (earliest first on ties), then a code per entry:
    code >= 0 destination row after compaction, code = -1 - r the entry is victim number r,
    code = INVALID past `total`.
  evict_move_kernel: walks j ascending in blocks; loads a block (cache row or new row), copies
    victims out to a [C]-row buffer and writes kept rows to their destination (<= j, so in-place
    compaction is safe with a barrier between the block's loads and stores); clears the tail.
  absorb_kernel: H[slot, h] += f^T v and z[slot, h] += sum f over the victim buffer, where
    f = psi(victim keys) * used, computed by torch matmuls between the launches.
"""

import triton
import triton.language as tl

PIN_SCORE = tl.constexpr(1e30)  # kernels/reference/evict.PIN_SCORE: a pinned (recalled) entry
INVALID = tl.constexpr(-(1 << 30))  # a constexpr: a plain global does not compile for a GPU (AOT-tested)


@triton.jit
def evict_select_kernel(
    sc_ptr, mc_ptr, mn_ptr, len_ptr, slot_ptr, code_ptr,
    C, B, recent, sink,
    ssc0, ssc1,
    MODE: tl.constexpr,  # 0 full, 1 h2o, 2 lambda
    BLOCK_T: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    Hkv = tl.num_programs(1)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    L = tl.load(len_ptr + slot).to(tl.int32)
    total = L + C
    j = tl.arange(0, BLOCK_T)  # [BLOCK_T] merged index
    valid = j < total
    protected = j >= total - recent
    if MODE == 1:
        sc = tl.load(sc_ptr + slot * ssc0 + h * ssc1 + j, mask=j < L, other=0.0)
        mc = tl.load(mc_ptr + (i * Hkv + h) * B + j, mask=j < L, other=0.0)
        mn = tl.load(mn_ptr + (i * Hkv + h) * C + (j - L), mask=(j >= L) & valid, other=0.0)
        prio = tl.where(j < L, sc + mc, mn)
    else:
        prio = j.to(tl.float32)
        if MODE == 2:  # the sinks, and pinned (recalled) entries: score >= PIN_SCORE
            sc = tl.load(sc_ptr + slot * ssc0 + h * ssc1 + j, mask=j < L, other=0.0)
            protected = protected | (j < sink) | (sc >= PIN_SCORE)
    cand = valid & ~protected
    victim = j < 0  # all False
    n_victims = tl.maximum(total - B, 0)
    for _ in range(0, n_victims):
        p = tl.where(cand & ~victim, prio, float("inf"))
        idx = tl.argmin(p, axis=0, tie_break_left=True)
        victim = victim | ((j == idx) & (p < float("inf")))
    kept = valid & ~victim
    dest = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    vrank = tl.cumsum(victim.to(tl.int32), axis=0) - 1
    code = tl.where(kept, dest, tl.where(victim, -1 - vrank, INVALID))
    tl.store(code_ptr + (i * Hkv + h) * BLOCK_T + j, code)


@triton.jit
def evict_move_kernel(
    kc_ptr, vc_ptr, pc_ptr, sc_ptr, len_ptr, slot_ptr,
    kn_ptr, vn_ptr, pn_ptr, mc_ptr, mn_ptr, code_ptr,
    vk_ptr, vv_ptr, used_ptr,
    C, B, D, CODE_T,
    skc0, skc1, skc2, svc0, svc1, svc2, spc0, spc1, ssc0, ssc1,
    skn0, skn1, skn2, svn0, svn1, svn2, spn0,
    WRITE_VICTIMS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    Hkv = tl.num_programs(1)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    L = tl.load(len_ptr + slot).to(tl.int32)
    total = L + C
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols[None, :] < D
    kc = kc_ptr + slot * skc0 + h * skc1
    vc = vc_ptr + slot * svc0 + h * svc1
    pc = pc_ptr + slot * spc0 + h * spc1
    sc = sc_ptr + slot * ssc0 + h * ssc1
    kn = kn_ptr + i * skn0 + h * skn1
    vn = vn_ptr + i * svn0 + h * svn1
    hb = i * Hkv + h
    for start in range(0, total, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)  # [BLOCK_J]
        jv = j < total
        code = tl.load(code_ptr + hb * CODE_T + j, mask=jv, other=INVALID)
        old = jv & (j < L)
        new = jv & (j >= L)
        t = j - L
        m2o = old[:, None] & dmask
        m2n = new[:, None] & dmask
        k = tl.where(old[:, None], tl.load(kc + j[:, None] * skc2 + dcols[None, :], mask=m2o, other=0.0),
                     tl.load(kn + t[:, None] * skn2 + dcols[None, :], mask=m2n, other=0.0).to(kc_ptr.dtype.element_ty))
        v = tl.where(old[:, None], tl.load(vc + j[:, None] * svc2 + dcols[None, :], mask=m2o, other=0.0),
                     tl.load(vn + t[:, None] * svn2 + dcols[None, :], mask=m2n, other=0.0).to(vc_ptr.dtype.element_ty))
        pos = tl.where(old, tl.load(pc + j, mask=old, other=0), tl.load(pn_ptr + i * spn0 + t, mask=new, other=0))
        score = tl.where(old, tl.load(sc + j, mask=old, other=0.0) + tl.load(mc_ptr + hb * B + j, mask=old, other=0.0),
                         tl.load(mn_ptr + hb * C + t, mask=new, other=0.0))
        tl.debug_barrier()  # every row of this block is loaded before any is overwritten
        keep = code >= 0
        d = tl.where(keep, code, 0)
        tl.store(kc + d[:, None] * skc2 + dcols[None, :], k, mask=keep[:, None] & dmask)
        tl.store(vc + d[:, None] * svc2 + dcols[None, :], v, mask=keep[:, None] & dmask)
        tl.store(pc + d, pos.to(pc_ptr.dtype.element_ty), mask=keep)
        tl.store(sc + d, score, mask=keep)
        if WRITE_VICTIMS:
            vic = (code < 0) & (code > INVALID)
            r = tl.where(vic, -1 - code, 0)
            tl.store(vk_ptr + (hb * C + r[:, None]) * D + dcols[None, :], k, mask=vic[:, None] & dmask)
            tl.store(vv_ptr + (hb * C + r[:, None]) * D + dcols[None, :], v, mask=vic[:, None] & dmask)
            tl.store(used_ptr + hb * C + r, tl.full([BLOCK_J], 1.0, tl.float32), mask=vic)
    tl.debug_barrier()
    new_len = tl.minimum(total, B)
    for start in range(new_len, B, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        tail = j < B
        tl.store(pc + j, tl.full([BLOCK_J], -1, tl.int32).to(pc_ptr.dtype.element_ty), mask=tail)
        tl.store(sc + j, tl.zeros([BLOCK_J], tl.float32), mask=tail)


@triton.jit
def absorb_kernel(
    f_ptr, vv_ptr, H_ptr, z_ptr, slot_ptr,
    C, R, D,
    sH0, sH1, sH2, sz0, sz1,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """f [n, Hkv, C, R] fp32 (zero rows for unused), vv [n, Hkv, C, D]: H += f^T vv, z += sum f."""
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    Hkv = tl.num_programs(1)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    hb = i * Hkv + h
    rc = tl.arange(0, BLOCK_R)
    dcols = tl.arange(0, BLOCK_D)
    accH = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    accz = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < C
        f = tl.load(f_ptr + (hb * C + cc[:, None]) * R + rc[None, :], mask=cm[:, None] & (rc[None, :] < R),
                    other=0.0)  # [BLOCK_C, BLOCK_R]
        v = tl.load(vv_ptr + (hb * C + cc[:, None]) * D + dcols[None, :], mask=cm[:, None] & (dcols[None, :] < D),
                    other=0.0).to(tl.float32)  # [BLOCK_C, BLOCK_D]
        accH += tl.dot(tl.trans(f), v, input_precision="ieee")
        accz += tl.sum(f, axis=0)
    hm = (rc[:, None] < R) & (dcols[None, :] < D)
    hp = H_ptr + slot * sH0 + h * sH1 + rc[:, None] * sH2 + dcols[None, :]
    tl.store(hp, tl.load(hp, mask=hm, other=0.0) + accH, mask=hm)
    zp = z_ptr + slot * sz0 + h * sz1 + rc
    tl.store(zp, tl.load(zp, mask=rc < R, other=0.0) + accz, mask=rc < R)
