"""Raw Triton kernels: compressed attention over slab slots (cache + LESS low-rank + causal chunk).

Program (slot i, KV head h, row block): the rows are the GQA group's query heads times the chunk's
queries, r = g * C + c, so each cached key is loaded once for the whole group. One online-softmax
pass over (a) the slot's `length` cached keys, read in place through slot_ids, and (b) the chunk's
new keys, causally; the LESS term is added in the epilogue with m' = max(m, 0).

Attention mass (sparse softmax summed over the group's rows), two ways:
  FUSED_MASS (all rows in one block; always the case for decode): raw logits go to a scratch
    [n, Hkv, G*C, B+C] during the pass and an epilogue turns them into probabilities with the final
    (m, l) - K and V are read once.
  otherwise the pass stores (m, l) per row and `attn_mass_kernel` recomputes the logits per key block.

KV_BITS 8 / 4 (a quantised slab, kernels/reference/kv_quant.py): the cached rows and the chunk's own
rows are read as codes - small integers, exact in every dot type - and their parameters are folded
in rather than multiplied into the rows, one dot per group of GROUP channels (the other channels
masked to zero): score = sum_g scale_g (q_g . u_g) + zero_g sum(q_g) + q . k_center, output
sum_g (p scale_g) @ u_g + (p . zero_g) on group g's channels (p scale_g rounded to the data type for
tensor-core dots, like native probabilities). 0: native rows, as before.
"""

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, DOT_PREC: tl.constexpr):
    # DOT_PREC "ieee": fp32 operands (fp32 data, and bf16 under the CPU interpreter whose bf16 dot is
    # broken in triton 3.x); otherwise native fp16 / bf16 operands with fp32 accumulation.
    if DOT_PREC == "ieee":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _scores(q, k, scale, DOT_PREC: tl.constexpr):
    # q: [BLOCK_M, BLOCK_D], k: [BLOCK_N, BLOCK_D] -> [BLOCK_M, BLOCK_N] fp32
    return _mm(q, tl.trans(k), DOT_PREC) * scale


@triton.jit
def _codes(base, stride, cols, cmask, dcols, dmask, dtype, KV_BITS: tl.constexpr, DOT_PREC: tl.constexpr):
    # a quantised slot's codes at rows `cols` [BLOCK_N, BLOCK_D] as a dot operand: fp32 for ieee dots,
    # else the data type (integers up to 255: exact). 4 bits: channel 2j in the low nibble of byte j.
    m = cmask[:, None] & dmask
    if KV_BITS == 8:
        u = tl.load(base + cols[:, None] * stride + dcols[None, :], mask=m, other=0).to(tl.float32)
    else:
        b = tl.load(base + cols[:, None] * stride + dcols[None, :] // 2, mask=m, other=0).to(tl.int32)
        u = ((b >> ((dcols[None, :] % 2) * 4)) & 15).to(tl.float32)
    if DOT_PREC != "ieee":
        u = u.to(dtype)
    return u


@triton.jit
def _param(base, cols, cmask, g, NG: tl.constexpr):
    # one channel group's scale or zero of rows `cols`: [BLOCK_N] fp32 (params are [rows, NG] fp16)
    return tl.load(base + cols * NG + g, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _quant_scores(q, u, s_base, z_base, cols, cmask, q_center, dcols, scale, DOT_PREC: tl.constexpr,
                  NG: tl.constexpr, GROUP: tl.constexpr):
    # q [BLOCK_M, BLOCK_D] (data type), u [BLOCK_N, BLOCK_D] codes, q_center = q . k_center [BLOCK_M]
    # -> scores [BLOCK_M, BLOCK_N] fp32 of the dequantised keys
    grp = dcols // GROUP
    s = tl.zeros([q.shape[0], u.shape[0]], tl.float32) + q_center[:, None]
    for g in tl.static_range(NG):
        qg = q * (grp == g)[None, :].to(q.dtype)  # the group's channels, exact
        s += _mm(qg, tl.trans(u), DOT_PREC) * _param(s_base, cols, cmask, g, NG)[None, :]
        s += tl.sum(qg.to(tl.float32), axis=1)[:, None] * _param(z_base, cols, cmask, g, NG)[None, :]
    return s * scale


@triton.jit
def _quant_values(p, u, s_base, z_base, cols, cmask, dcols, DOT_PREC: tl.constexpr, NG: tl.constexpr,
                  GROUP: tl.constexpr):
    # p [BLOCK_M, BLOCK_N] fp32, u [BLOCK_N, BLOCK_D] value codes -> p @ (dequantised values) fp32
    grp = dcols // GROUP
    o = tl.zeros([p.shape[0], u.shape[1]], tl.float32)
    for g in tl.static_range(NG):
        on = (grp == g)[None, :]
        o += _mm((p * _param(s_base, cols, cmask, g, NG)[None, :]).to(u.dtype), u * on.to(u.dtype), DOT_PREC)
        o += tl.sum(p * _param(z_base, cols, cmask, g, NG)[None, :], axis=1)[:, None] * on.to(tl.float32)
    return o


@triton.jit
def _q_center(q, c_base, dcols, D, KV_BITS: tl.constexpr):
    # q . k_center per row [BLOCK_M] fp32 (quantised keys; 0 for native rows: nothing read)
    if KV_BITS > 0:
        center = tl.load(c_base + dcols, mask=dcols < D, other=0.0)
        qc = tl.sum(q.to(tl.float32) * center[None, :], axis=1)
    else:
        qc = tl.zeros([q.shape[0]], tl.float32)
    return qc


@triton.jit
def attn_fwd_kernel(
    q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, len_ptr, slot_ptr,
    H_ptr, z_ptr, phi_ptr, kns_ptr, knz_ptr, vns_ptr, vnz_ptr, kcs_ptr, kcz_ptr, vcs_ptr, vcz_ptr, cen_ptr,
    out_ptr, m_ptr, l_ptr, logit_ptr, mc_ptr, mn_ptr,
    C, G, B, D, R, scale,
    sq0, sq1, sq2, so0, so1, so2,
    skn0, skn1, skn2, svn0, svn1, svn2,
    skc0, skc1, skc2, svc0, svc1, svc2,
    sH0, sH1, sH2, sz0, sz1, sp0, sp1, sp2,
    snp0, snp1, scp0, scp1, sce0, sce1,
    HAS_LESS: tl.constexpr, FUSED_MASS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    KV_BITS: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)  # int64: offsets of large batches / chunks exceed 2^31
    h = tl.program_id(1).to(tl.int64)
    Hkv = tl.num_programs(1)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    L = tl.load(len_ptr + slot).to(tl.int32)
    GC = G * C
    T = B + C
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rvalid = rows < GC
    g = tl.where(rvalid, rows // C, 0)
    c = rows % C
    qh = h * G + g  # query head per row
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols[None, :] < D
    q = tl.load(q_ptr + i * sq0 + qh[:, None] * sq1 + c[:, None] * sq2 + dcols[None, :],
                mask=rvalid[:, None] & dmask, other=0.0)  # [BLOCK_M, BLOCK_D]
    q_center = _q_center(q, cen_ptr + slot * sce0 + h * sce1, dcols, D, KV_BITS)  # quantised keys only
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lg_rows = logit_ptr + ((i * Hkv + h) * GC + rows[:, None]).to(tl.int64) * T  # [BLOCK_M, 1]

    # (a) cached keys of this slot and KV head, read in place
    kc_base = kc_ptr + slot * skc0 + h * skc1
    vc_base = vc_ptr + slot * svc0 + h * svc1
    cp = slot * scp0 + h * scp1  # this slot and head's rows of the cache's scales / zeros
    for start in range(0, L, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        cmask = cols < L
        if KV_BITS == 0:
            k = tl.load(kc_base + cols[:, None] * skc2 + dcols[None, :], mask=cmask[:, None] & dmask, other=0.0)
            s = _scores(q, k, scale, DOT_PREC)
        else:
            u = _codes(kc_base, skc2, cols, cmask, dcols, dmask, q.dtype, KV_BITS, DOT_PREC)
            s = _quant_scores(q, u, kcs_ptr + cp, kcz_ptr + cp, cols, cmask, q_center, dcols, scale, DOT_PREC,
                              NG, GROUP)
        s = tl.where(cmask[None, :], s, float("-inf"))
        if FUSED_MASS:
            tl.store(lg_rows + cols[None, :], s, mask=rvalid[:, None] & cmask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KV_BITS == 0:
            v = tl.load(vc_base + cols[:, None] * svc2 + dcols[None, :], mask=cmask[:, None] & dmask, other=0.0)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_PREC)
        else:
            u = _codes(vc_base, svc2, cols, cmask, dcols, dmask, q.dtype, KV_BITS, DOT_PREC)
            acc = acc * alpha[:, None] + _quant_values(p, u, vcs_ptr + cp, vcz_ptr + cp, cols, cmask, dcols,
                                                       DOT_PREC, NG, GROUP)
        m_i = m_new

    # (b) the chunk's own keys, causally
    kn_base = kn_ptr + i * skn0 + h * skn1
    vn_base = vn_ptr + i * svn0 + h * svn1
    np_ = i * snp0 + h * snp1  # the chunk's rows of its scales / zeros
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < C
        if KV_BITS == 0:
            k = tl.load(kn_base + cols[:, None] * skn2 + dcols[None, :], mask=cmask[:, None] & dmask, other=0.0)
            s = _scores(q, k, scale, DOT_PREC)
        else:
            u = _codes(kn_base, skn2, cols, cmask, dcols, dmask, q.dtype, KV_BITS, DOT_PREC)
            s = _quant_scores(q, u, kns_ptr + np_, knz_ptr + np_, cols, cmask, q_center, dcols, scale, DOT_PREC,
                              NG, GROUP)
        ok = cmask[None, :] & (cols[None, :] <= c[:, None])
        s = tl.where(ok, s, float("-inf"))
        if FUSED_MASS:
            tl.store(lg_rows + B + cols[None, :], s, mask=rvalid[:, None] & cmask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KV_BITS == 0:
            v = tl.load(vn_base + cols[:, None] * svn2 + dcols[None, :], mask=cmask[:, None] & dmask, other=0.0)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_PREC)
        else:
            u = _codes(vn_base, svn2, cols, cmask, dcols, dmask, q.dtype, KV_BITS, DOT_PREC)
            acc = acc * alpha[:, None] + _quant_values(p, u, vns_ptr + np_, vnz_ptr + np_, cols, cmask, dcols,
                                                       DOT_PREC, NG, GROUP)
        m_i = m_new

    # epilogue: the LESS low-rank term stands in for the evicted tokens' unnormalised e^{s}
    if HAS_LESS:
        rc = tl.arange(0, BLOCK_R)
        rmask = rc < R
        phi = tl.load(phi_ptr + i * sp0 + qh[:, None] * sp1 + c[:, None] * sp2 + rc[None, :],
                      mask=rvalid[:, None] & rmask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] fp32
        Hs = tl.load(H_ptr + slot * sH0 + h * sH1 + rc[:, None] * sH2 + dcols[None, :],
                     mask=rmask[:, None] & dmask, other=0.0)  # [BLOCK_R, BLOCK_D] fp32
        zs = tl.load(z_ptr + slot * sz0 + h * sz1 + rc, mask=rmask, other=0.0)  # [BLOCK_R]
        mp = tl.maximum(m_i, 0.0)
        a = tl.exp(m_i - mp)
        b = tl.exp(-mp)
        num = acc * a[:, None] + b[:, None] * tl.dot(phi, Hs, input_precision="ieee")
        den = l_i * a + b * tl.sum(phi * zs[None, :], axis=1)
    else:
        num = acc
        den = l_i
    o = num / den[:, None]
    tl.store(out_ptr + i * so0 + qh[:, None] * so1 + c[:, None] * so2 + dcols[None, :],
             o.to(out_ptr.dtype.element_ty), mask=rvalid[:, None] & dmask)

    if FUSED_MASS:
        tl.debug_barrier()  # the logits written above are read back by other threads
        inv_l = 1.0 / l_i
        mc_base = mc_ptr + (i * Hkv + h) * B
        for start in range(0, B, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            ok = rvalid[:, None] & (cols[None, :] < L)
            s = tl.load(lg_rows + cols[None, :], mask=ok, other=float("-inf"))
            p = tl.exp(s - m_i[:, None]) * inv_l[:, None]
            tl.store(mc_base + cols, tl.sum(p, axis=0), mask=cols < B)
        mn_base = mn_ptr + (i * Hkv + h) * C
        for start in range(0, C, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            ok = rvalid[:, None] & (cols[None, :] < C) & (cols[None, :] <= c[:, None])
            s = tl.load(lg_rows + B + cols[None, :], mask=ok, other=float("-inf"))
            p = tl.exp(s - m_i[:, None]) * inv_l[:, None]
            tl.store(mn_base + cols, tl.sum(p, axis=0), mask=cols < C)
    else:
        st = (i * Hkv + h) * GC + rows
        tl.store(m_ptr + st, m_i, mask=rvalid)
        tl.store(l_ptr + st, l_i, mask=rvalid)


@triton.jit
def _mass_of_keys(
    q_ptr, m_ptr, l_ptr, k, cols, cvalid, i, h, Hkv, C, G, D, scale, sq0, sq1, sq2,
    s_base, z_base, c_base,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_BITS: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr,
):
    # k: [BLOCK_N, BLOCK_D] keys at `cols` (a quantised slot's codes, with their scales / zeros at
    # s_base / z_base and the key center at c_base); returns their mass summed over all G*C rows: [BLOCK_N]
    GC = G * C
    dcols = tl.arange(0, BLOCK_D)
    mass = tl.zeros([BLOCK_N], tl.float32)
    for r0 in range(0, GC, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rvalid = rows < GC
        g = tl.where(rvalid, rows // C, 0)
        c = rows % C
        q = tl.load(q_ptr + i * sq0 + (h * G + g)[:, None] * sq1 + c[:, None] * sq2 + dcols[None, :],
                    mask=rvalid[:, None] & (dcols[None, :] < D), other=0.0)
        st = (i * Hkv + h) * GC + rows
        m = tl.load(m_ptr + st, mask=rvalid, other=0.0)
        inv_l = 1.0 / tl.load(l_ptr + st, mask=rvalid, other=1.0)
        if KV_BITS == 0:
            s = _scores(q, k, scale, DOT_PREC)
        else:
            s = _quant_scores(q, k, s_base, z_base, cols, cvalid, _q_center(q, c_base, dcols, D, KV_BITS), dcols,
                              scale, DOT_PREC, NG, GROUP)
        ok = rvalid[:, None] & cvalid[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= c[:, None])
        p = tl.where(ok, tl.exp(s - m[:, None]) * inv_l[:, None], 0.0)
        mass += tl.sum(p, axis=0)
    return mass


@triton.jit
def attn_mass_kernel(
    q_ptr, kn_ptr, kc_ptr, len_ptr, slot_ptr, m_ptr, l_ptr, mc_ptr, mn_ptr, kns_ptr, knz_ptr, kcs_ptr, kcz_ptr,
    cen_ptr,
    C, G, B, D, scale, NB_CACHE,
    sq0, sq1, sq2, skn0, skn1, skn2, skc0, skc1, skc2, snp0, snp1, scp0, scp1, sce0, sce1,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_BITS: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr,
):
    """Grid (n, Hkv, NB_CACHE + cdiv(C, BLOCK_N)): one block of keys per program."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    kb = tl.program_id(2)
    Hkv = tl.num_programs(1)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    L = tl.load(len_ptr + slot).to(tl.int32)
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols[None, :] < D
    c_base = cen_ptr + slot * sce0 + h * sce1
    dt = q_ptr.dtype.element_ty
    if kb < NB_CACHE:
        cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        cvalid = cols < L
        if KV_BITS == 0:
            k = tl.load(kc_ptr + slot * skc0 + h * skc1 + cols[:, None] * skc2 + dcols[None, :],
                        mask=cvalid[:, None] & dmask, other=0.0)
        else:
            k = _codes(kc_ptr + slot * skc0 + h * skc1, skc2, cols, cvalid, dcols, dmask, dt, KV_BITS, DOT_PREC)
        cp = slot * scp0 + h * scp1
        mass = _mass_of_keys(q_ptr, m_ptr, l_ptr, k, cols, cvalid, i, h, Hkv, C, G, D, scale, sq0, sq1, sq2,
                             kcs_ptr + cp, kcz_ptr + cp, c_base,
                             False, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_D, KV_BITS, NG, GROUP)
        tl.store(mc_ptr + (i * Hkv + h) * B + cols, mass, mask=cols < B)
    else:
        cols = (kb - NB_CACHE) * BLOCK_N + tl.arange(0, BLOCK_N)
        cvalid = cols < C
        if KV_BITS == 0:
            k = tl.load(kn_ptr + i * skn0 + h * skn1 + cols[:, None] * skn2 + dcols[None, :],
                        mask=cvalid[:, None] & dmask, other=0.0)
        else:
            k = _codes(kn_ptr + i * skn0 + h * skn1, skn2, cols, cvalid, dcols, dmask, dt, KV_BITS, DOT_PREC)
        np_ = i * snp0 + h * snp1
        mass = _mass_of_keys(q_ptr, m_ptr, l_ptr, k, cols, cvalid, i, h, Hkv, C, G, D, scale, sq0, sq1, sq2,
                             kns_ptr + np_, knz_ptr + np_, c_base,
                             True, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_D, KV_BITS, NG, GROUP)
        tl.store(mn_ptr + (i * Hkv + h) * C + cols, mass, mask=cvalid)
