"""Quantised session slots (EngineConfig.kv_bits, `--kv-bits`): the config and the slab's real bytes,
slots that fork / export / reset as they are, a slot that offloads and restores bit for bit (codes,
scales, profile; the next token's logits too) and refuses records of another layout, `+recall`
refused, and perplexity close to native on a real-model window."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from lessserve.cache_store import codec
from lessserve.cache_store.errors import IncompatibleCacheError
from lessserve.workers.compression import less_state_tokens, token_bytes
from lessserve.workers.config import EngineConfig
from lessserve.workers.device_tier import EngineDeviceTier
from lessserve.workers.errors import ConfigError, SlotStateError
from lessserve.workers.slots import QUANT_FIELDS, SlotSlab

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tinyshakespeare.txt"
CPU = torch.device("cpu")


def test_kv_bits_config_values():
    assert EngineConfig().kv_bits == "native"
    assert [EngineConfig(kv_bits=v).kv_bits for v in ("native", "8", "4", 8, 4)] == ["native", "8", "4", "8", "4"]
    for bad in ("3", 16, "int8", True):
        with pytest.raises(ValidationError, match="kv_bits"):
            EngineConfig(kv_bits=bad)


@pytest.mark.parametrize("policy", ["h2o+recall", "lambda+less+recall"])
def test_recall_is_refused_with_quantised_slots(tiny_engine_factory, policy):
    with pytest.raises(ConfigError, match="kv_bits"):
        tiny_engine_factory(policy=policy, kv_bits="8")


def test_four_bits_need_an_even_head_dim():
    with pytest.raises(ConfigError, match="kv_bits 4"):
        SlotSlab(2, 2, 15, 2, 8, 0, CPU, torch.float32, "4")


# --- bytes ----------------------------------------------------------------------------------------
def test_slot_bytes_count_codes_scales_and_profile():
    """The default model's h2o slot at budget 128 (30 layers, 3 KV heads, head_dim 64), counted by
    hand: per token and head k + v (or their codes + an fp16 scale and zero per group of 32
    channels) + position + score, a key center of 64 fp32 per layer and head, the length."""
    L, Hkv, D, B = 30, 3, 64, 128
    want = {"native": L * Hkv * B * (2 * D * 4 + 8) + 4,  # 5,990,404 (docs/engine.md)
            "8": L * Hkv * B * (2 * (D + 2 * 4) + 8) + L * Hkv * D * 4 + 4,
            "4": L * Hkv * B * (2 * (D // 2 + 2 * 4) + 8) + L * Hkv * D * 4 + 4}
    got = {b: SlotSlab(L, Hkv, D, 1, B, 0, torch.device("meta"), torch.float32, b).slot_bytes() for b in want}
    assert got == want == {"native": 5_990_404, "8": 1_774_084, "4": 1_036_804}
    assert SlotSlab(L, Hkv, D, 1, B, 0, torch.device("meta"), torch.bfloat16).slot_bytes() == 3_041_284
    assert token_bytes(D, 4, "8") == 152 and token_bytes(D, 4, "4") == 88 and token_bytes(D, 2) == 264
    # the equal-memory `+` baseline buys tokens at the slot's own price per token
    assert less_state_tokens(8, 64, 4) == 4 and less_state_tokens(8, 64, 4, "8") == 14
    assert less_state_tokens(8, 64, 4, "4") == 24


def test_engine_reports_the_quantised_slot_bytes(tiny_engine_factory):
    for bits in ("native", "8", "4"):
        e = tiny_engine_factory(kv_bits=bits)
        s = e.alloc()
        assert e.stats(s)["cache_bytes"] == e.slab.slot_bytes() and e.slab.kv_bits == bits
        assert e.slab.total_bytes() == e.slab.num_slots * (e.slab.slot_bytes() - 4) + 4 * e.slab.num_slots


# --- the slab -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", ["8", "4"])
def test_quantised_slab_fork_export_load_reset(tiny_engine_factory, bits):
    e = tiny_engine_factory(kv_bits=bits)
    slab = e.slab
    assert not hasattr(slab, "k") and slab.fields[:7] == QUANT_FIELDS
    a = e.alloc()
    e.prefill(a, list(range(1, 30)))
    assert int(slab.length[a]) == 16 and bool(slab.k_center[:, a].ne(0).all())
    b, c = e.alloc(), e.alloc()
    slab.copy(a, b)  # a fork
    state = slab.export(a)
    slab.load(c, state)  # a restore from host memory
    for f in slab.fields:
        assert torch.equal(getattr(slab, f)[:, b], getattr(slab, f)[:, a]), f
        assert torch.equal(getattr(slab, f)[:, c], getattr(slab, f)[:, a]), f
        assert state[f].dtype == getattr(slab, f).dtype and state[f].is_contiguous()
    want = e.decode([a], [7])
    assert torch.equal(e.decode([b], [7]), want) and torch.equal(e.decode([c], [7]), want)
    slab.reset(c)
    assert all(not getattr(slab, f)[:, c].any() for f in slab.fields if f != "pos")
    assert bool((slab.pos[:, c] == -1).all()) and int(slab.length[c]) == 0
    with pytest.raises(SlotStateError, match="kv_bits"):
        slab.load(c, {k: v for k, v in state.items() if k != "k_codes"})


# --- offload and restore --------------------------------------------------------------------------
def _talk(e, slot, n: int = 45):
    e.prefill(slot, [(7 * i) % 120 + 1 for i in range(n)])


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("bits", ["8", "4"])
def test_a_quantised_slot_travels_as_it_is(tiny_engine_factory, bits, quantize):
    """Export -> put into another engine: the same codes, scales, zeros, key center, state bit for bit,
    the same bytes back out, and the same next-token logits ("quantize" does not quantise again)."""
    tier = EngineDeviceTier(tiny_engine_factory(kv_bits=bits), quantize=quantize)
    e = tier.engine
    slot = tier.new_slot("s")
    _talk(e, slot)
    before = e.slab.export(slot)
    blob = tier.get("s")
    d = codec.decode(blob, tier.identity)
    assert d.meta["slot"]["kv_bits"] == bits and d.meta["slot"]["quant"] == "none"
    other = EngineDeviceTier(tiny_engine_factory(kv_bits=bits))
    other.put("s", blob)
    s2 = other.slot_of("s")
    after = other.engine.slab.export(s2)
    for f in [*e.slab.fields, "length", "seen"]:
        assert torch.equal(after[f], before[f]), f
    assert bytes(other.get("s")) == bytes(blob)  # same bytes in, same bytes out
    assert torch.equal(other.engine.decode([s2], [11]), e.decode([slot], [11]))


def test_a_quantised_slot_with_less_restores_bit_for_bit_on_the_default_model(default_engine):
    """The default model, h2o+less at budget 16 (eviction and absorption happened): the restored slot
    is the slot that left, H and z included, and both go on to the same logits."""
    a, b = default_engine(policy="h2o+less", kv_bits="4"), default_engine(policy="h2o+less", kv_bits="4")
    ta, tb = EngineDeviceTier(a), EngineDeviceTier(b)
    slot = ta.new_slot("s")
    a.prefill(slot, a.tokenizer.encode("The river crossed the old town, and the bridge was built of stone "
                                       "by the monks who lived there for many centuries."))
    state = a.slab.export(slot)
    assert float(state["z"].abs().sum()) > 0 and int(state["seen"][0]) > 16
    tb.put("s", ta.get("s"))
    got = b.slab.export(tb.slot_of("s"))
    assert all(torch.equal(got[f], state[f]) for f in [*a.slab.fields, "length", "seen"])
    assert torch.equal(b.decode([tb.slot_of("s")], [42]), a.decode([slot], [42]))


def test_records_of_another_layout_are_refused(tiny_engine_factory):
    """A native (older) record into a quantised engine, 8-bit into 4-bit, quantised into native, and
    forged descriptions: IncompatibleCacheError before any slot is touched."""
    tiers = {b: EngineDeviceTier(tiny_engine_factory(kv_bits=b)) for b in ("native", "8", "4")}
    blobs = {}
    for b, t in tiers.items():
        _talk(t.engine, t.new_slot("s"), 20)
        blobs[b] = t.get("s")
    info = codec.decode(blobs["8"], tiers["8"].identity).meta["slot"]
    rec = codec.decode(blobs["8"], tiers["8"].identity).tensors["slot"]
    forged = [bytes(codec.encode({"slot": rec.clone()}, tiers["8"].identity, {"slot": i}))
              for i in ({**info, "kv_bits": "4"}, {k: v for k, v in info.items() if k != "kv_bits"},
                        {**info, "quant": "int8"})]
    cases = [("8", blobs["native"]), ("4", blobs["native"]), ("4", blobs["8"]), ("native", blobs["4"]),
             ("8", forged[0]), ("8", forged[1]), ("8", forged[2])]
    for i, (b, blob) in enumerate(cases):
        t = tiers[b]
        free = t.engine.slab.free_slots
        with pytest.raises(IncompatibleCacheError):
            t.put(f"x{i}", blob)
        assert not t.contains(f"x{i}") and t.engine.slab.free_slots == free, i


# --- quality ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quantised_perplexity_is_close_to_native(default_engine):
    """One 512-token window of tinyshakespeare, h2o at budget 128 (eviction from token 128 on), prefill
    chunk 64: 8 bits within 2% and 4 bits within 15% of native perplexity (a broken layout, a wrong
    nibble order or scale, is off by far more)."""
    if not TEXT.is_file():
        pytest.skip(f"tinyshakespeare not found at {TEXT} (../shared/data beside the checkout)")
    ppl = {}
    for bits in ("native", "8", "4"):
        e = default_engine(policy="h2o", budget=128, prefill_chunk=64, max_slots=1, kv_bits=bits)
        ids = e.tokenizer(TEXT.read_text()[:20_000], add_special_tokens=False)["input_ids"][2000:2512]
        slot = e.alloc()
        logits = e.prefill(slot, ids, all_logits=True)[:-1].float()
        ppl[bits] = math.exp(float(F.cross_entropy(logits, torch.tensor(ids[1:]))))
        e.free(slot)
    print("ppl", {b: round(p, 4) for b, p in ppl.items()})
    assert ppl["8"] != ppl["native"] and abs(ppl["8"] / ppl["native"] - 1) < 0.02
    assert abs(ppl["4"] / ppl["native"] - 1) < 0.15
