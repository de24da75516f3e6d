"""Analytic costs (refslm.flops) against hand formulas, against the shapes the model declares, and against
what the model executes (CountingBackend); and `refslm bench paper --quick` end to end."""

import csv
import json
import math

import numpy as np
import pytest

from refslm import flops
from refslm.bench.counting import CountingBackend
from refslm.bench.paper import matched_decoder_only, paper_small
from refslm.cli import main
from refslm.config import PRESETS, DecoderOnlyConfig, EncoderDecoderConfig, tiny_decoder_only, tiny_encoder_decoder
from refslm.generate import CachedDecoder
from refslm.models import from_params, init, param_shapes

# Hand-sized widths: C = 8, query width 4 (2 heads of D = 2), key/value width 2 (1 head), F = 16, V = 32.
HAND = dict(n_embd=8, qkv_embd=4, n_head=2, n_kv_head=1, hidden_dim=16, vocab_size=32, eos_token_id=2)
HAND_ED = EncoderDecoderConfig(n_encoder_layer=2, n_decoder_layer=1, **HAND)
HAND_DO = DecoderOnlyConfig(n_layer=2, **HAND)


def test_gemm_convention():
    assert flops.gemm(3, 5, 7) == 2 * 3 * 5 * 7


def test_encoder_decoder_prefill_by_hand():
    # L = 3. Encoder block: q 2*3*8*4 = 192, k and v 2*3*8*2 = 96 each, out 2*3*4*8 = 192 -> 576;
    # scores 2*(2 heads)*3*3*2 = 72, values 72 -> 144; fc1 and fc2 2*3*8*16 = 768 each -> 1536. Two blocks.
    # Cross K/V of 3 encoder outputs: 2 * (2*3*8*2) = 192. Decoder on BOS: self q 64, k 32, v 32, out 64;
    # cross q 64, out 64 -> 320 projections; self attention 2*(2*2*1*1*2) = 16, cross 2*(2*2*1*3*2) = 48;
    # MLP 2 * 2*1*8*16 = 512; head 2*1*32*8 = 512.
    expected = flops.Flops(projections=2 * 576 + 192 + 320, attention=2 * 144 + 16 + 48, mlp=2 * 1536 + 512, head=512)
    assert flops.prefill_flops(HAND_ED, 3) == expected
    assert expected.total == 6112


def test_encoder_decoder_decode_step_by_hand():
    # Step 1 feeds the first generated token at decoder position 1: self attention over 2 keys
    # 2*(2*2*1*2*2) = 32, cross over the 3 encoder keys 48; projections 320, MLP 512, head 512.
    assert flops.decode_step_flops(HAND_ED, 3, 1) == flops.Flops(projections=320, attention=32 + 48, mlp=512, head=512)
    # Batch 2 doubles everything.
    assert flops.decode_step_flops(HAND_ED, 3, 1, batch=2).total == 2 * (320 + 80 + 512 + 512)


def test_decoder_only_by_hand():
    # Prefill of 3 tokens: two blocks of 576 projections, 144 attention, 1536 MLP; head on the last position only.
    assert flops.prefill_flops(HAND_DO, 3) == flops.Flops(projections=1152, attention=288, mlp=3072, head=512)
    # Step 1 feeds the first generated token at position 3: 4 keys, 2*(2*2*1*4*2) = 64 per block.
    assert flops.decode_step_flops(HAND_DO, 3, 1) == flops.Flops(projections=384, attention=128, mlp=1024, head=512)
    # Generation of 3 tokens = prefill + steps 1 and 2 (5 keys: 80 per block).
    step2 = flops.Flops(projections=384, attention=160, mlp=1024, head=512)
    assert flops.generation_flops(HAND_DO, 3, 3) == flops.prefill_flops(HAND_DO, 3) + \
        flops.decode_step_flops(HAND_DO, 3, 1) + step2


def test_kv_cache_bytes_by_hand():
    # float32, L = 3, N = 4. ED self: 1 layer * 4 positions * (k, v) * 1 head * D 2 * 4 bytes = 64;
    # cross: 1 * 3 * 2 * 2 * 4 = 48. DO: 2 layers * (3 + 4 - 1) positions * 2 * 2 * 4 = 192.
    assert flops.kv_cache_bytes(HAND_ED, 3, 4) == {"self": 64, "cross": 48, "total": 112}
    assert flops.kv_cache_bytes(HAND_DO, 3, 4) == {"self": 192, "cross": 0, "total": 192}
    assert flops.kv_cache_bytes(HAND_DO, 3, 4, dtype="float64", batch=3)["total"] == 192 * 2 * 3


def test_decode_step_bytes_by_hand():
    # float32. ED decoder block without the cross K/V projections: self attention 8*(4+2+2+4) weights + 16 biases
    # = 112; cross q 8*4+4 = 36 and out 4*8+8 = 40; MLP 2*8*16+16+8 = 280; three norms 24 -> 492 parameters;
    # + ln_f 8 + tied head 32*8 = 256 -> 756 * 4 bytes. Step 1, L = 3: 2 self + 3 cross positions of
    # (k, v) * 1 head * D 2 * 4 bytes = 16 each.
    assert flops.decode_step_bytes(HAND_ED, 3, 1) == 756 * 4 + 5 * 16
    # DO: every parameter (2 blocks of 112 + 280 + 16, final norm 8, embedding 256: 1080), 3 + 1 positions per block.
    assert flops.param_counts(HAND_DO)["total"] == 1080
    assert flops.decode_step_bytes(HAND_DO, 3, 1) == 1080 * 4 + 2 * 4 * 16


def _component_of_name(name: str) -> str:
    if "wte" in name or "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "head"
    if "attn" in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "norms"


CONFIGS = [
    tiny_encoder_decoder(), tiny_decoder_only(), tiny_decoder_only(layout="llama"),
    tiny_decoder_only(layout="phi3", tie_word_embeddings=False), tiny_decoder_only(layout="llama", mlp_bias=True),
    PRESETS["paper-330m"](), PRESETS["paper-330m-decoder-only"](), paper_small(),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.kind}-{getattr(c, 'layout', 'mu')}-{c.n_embd}")
def test_param_counts_match_declared_shapes(cfg):
    by_component = dict.fromkeys(("embedding", "attention", "mlp", "norms", "head"), 0)
    for name, shape in param_shapes(cfg).items():
        by_component[_component_of_name(name)] += math.prod(shape)
    assert flops.param_counts(cfg) == {**by_component, "total": sum(by_component.values())}


def test_paper_330m_counts_and_matched_baseline():
    ed, do = PRESETS["paper-330m"](), PRESETS["paper-330m-decoder-only"]()
    assert flops.param_counts(ed)["total"] == 332_042_240  # the paper's 332.04M with tied embeddings
    assert do.n_layer == 31 and matched_decoder_only(ed) == do
    assert flops.param_counts(do)["total"] == 329_793_792


@pytest.mark.parametrize("ed", [paper_small(), tiny_encoder_decoder(), PRESETS["paper-330m"]()])
def test_matched_decoder_only_is_closest(ed):
    do = matched_decoder_only(ed)
    target = flops.param_counts(ed)["total"]

    def gap(n_layer):
        fields = {k: v for k, v in do.to_dict().items() if k != "kind"}
        return abs(flops.param_counts(DecoderOnlyConfig(**{**fields, "n_layer": n_layer}))["total"] - target)

    assert all(gap(do.n_layer) <= gap(n) for n in range(1, 3 * do.n_layer))


def _counting_model(cfg, dtype="float64"):
    counter = CountingBackend(cfg, "numpy")
    return counter, from_params(cfg, init(cfg, seed=1, dtype=dtype).params, dtype=dtype, backend=counter)


@pytest.mark.parametrize("cfg", CONFIGS[:5], ids=lambda c: f"{c.kind}-{getattr(c, 'layout', 'mu')}")
def test_analytic_flops_equal_counted_per_phase(cfg):
    counter, model = _counting_model(cfg)
    batch, length, new_tokens = 2, 7, 4
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(batch, length))
    decoder = CachedDecoder(model, ids, new_tokens)
    assert counter.flops == flops.prefill_flops(cfg, length, batch)
    for step in range(1, new_tokens):
        counter.reset()
        decoder.step(np.argmax(decoder.logits, axis=-1))
        assert counter.flops == flops.decode_step_flops(cfg, length, step, batch), f"step {step}"


@pytest.mark.parametrize("cfg", [tiny_encoder_decoder(), tiny_decoder_only()], ids=["ed", "do"])
def test_analytic_flops_equal_counted_generate(cfg):
    counter, model = _counting_model(cfg, "float32")
    ids = np.random.default_rng(2).integers(3, cfg.vocab_size, size=(1, 11))
    tokens = model.generate(ids, 6, greedy=True)
    assert counter.flops == flops.generation_flops(cfg, 11, 6)
    # The wrapper changes nothing: the plain NumPy model generates the same tokens.
    plain = init(cfg, seed=1, dtype="float32")
    np.testing.assert_array_equal(tokens, plain.generate(ids, 6, greedy=True))


@pytest.mark.parametrize("cfg", [tiny_encoder_decoder(), tiny_decoder_only()], ids=["ed", "do"])
def test_kv_cache_bytes_equal_model_caches(cfg):
    model = init(cfg, seed=0, dtype="float32")
    batch, length, new_tokens = 2, 5, 6
    ids = np.random.default_rng(3).integers(3, cfg.vocab_size, size=(batch, length))
    decoder = CachedDecoder(model, ids, new_tokens)
    for _ in range(new_tokens - 1):
        decoder.step(np.argmax(decoder.logits, axis=-1))
    capacity = decoder.caches[0].k.shape[-2]
    allocated = sum(c.k.nbytes + c.v.nbytes for c in decoder.caches)
    cross = sum(k.nbytes + v.nbytes for k, v, _ in decoder.cross) if decoder.cross else 0
    expected = flops.kv_cache_bytes(cfg, length, new_tokens, "float32", batch)
    assert expected["self"] == allocated // capacity * decoder.length
    assert expected["cross"] == cross


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="input_len"):
        flops.prefill_flops(HAND_ED, 0)
    with pytest.raises(ValueError, match="step"):
        flops.decode_step_flops(HAND_DO, 3, 0)
    with pytest.raises(ValueError, match="new_tokens"):
        flops.generation_flops(HAND_DO, 3, 0)
    ntk = DecoderOnlyConfig(n_layer=1, **{**HAND, "qkv_embd": 8, "rope_factor": 2.0}, block_size=4)  # D = 4
    with pytest.raises(ValueError, match="dynamic NTK"):
        flops.generation_flops(ntk, 3, 4)
    with pytest.raises(ValueError, match="ambiguous"):
        CountingBackend(DecoderOnlyConfig(n_layer=1, **{**HAND, "hidden_dim": 4}))


def test_bench_paper_quick_end_to_end(tmp_path, capsys):
    status = main(["bench", "paper", "--quick", "--repeat", "1", "--backend", "numpy", "--out", str(tmp_path)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "first_token" in printed and "4.70" in printed
    with open(tmp_path / "paper.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["input_len"]) for r in rows] == [32, 64, 128]
    assert all(r["flops_match"] == "True" and r["backend"] == "numpy" for r in rows)
    result = json.loads((tmp_path / "paper.json").read_text())
    assert result["meta"]["sizes"]["small"]["ed"]["params"]["total"] == flops.param_counts(paper_small())["total"]
    for row in result["rows"]:
        assert row["flops_ed"] == flops.generation_flops(paper_small(), row["input_len"], 16).total
        assert row["first_token_s_ed"] > 0 and row["throughput_tok_s_do"] > 0 and row["peak_extra_bytes_do"] > 0
