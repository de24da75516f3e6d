"""Models: names and shapes, invariants of masks and positions, GQA order, errors, and float64 checks
against independent PyTorch code (written from the reference document) and Hugging Face transformers."""

import math

import numpy as np
import pytest

from refslm import config, models
from refslm.config import tiny_decoder_only, tiny_encoder_decoder

ENC = np.array([[1, 5, 6, 7, 9, 4], [1, 8, 9, 11, 3, 3]])
DEC = np.array([[1, 20, 21, 22], [1, 30, 31, 32]])

ALL_KINDS = {
    "encoder_decoder": lambda **kw: tiny_encoder_decoder(**kw),
    "mu": lambda **kw: tiny_decoder_only(**kw),
    "llama": lambda **kw: tiny_decoder_only(layout="llama", is_interleaved=True, **kw),
    "phi3": lambda **kw: tiny_decoder_only(layout="phi3", is_interleaved=True, tie_word_embeddings=False, **kw),
}


def run(model, enc=ENC, dec=DEC, **kw):
    return model.logits(enc, dec, **kw) if model.is_encoder_decoder else model.logits(enc, **kw)


def rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


# ---------------------------------------------------------------- names and shapes


def test_paper_330m_parameter_count():
    # the paper: 332.04M parameters with tied embeddings
    shapes = models.param_shapes(config.paper_330m())
    assert sum(math.prod(s) for s in shapes.values()) == 332_042_240
    assert "lm_head.weight" not in shapes
    assert shapes["transformer.e.19.attn.k_linear.weight"] == (192, 1024)
    assert shapes["transformer.h.9.cross_attn.out_linear.weight"] == (1024, 384)
    assert shapes["transformer.h.0.ln3.weight"] == (1024,)


def test_decoder_only_names():
    llama = models.param_shapes(tiny_decoder_only(layout="llama", tie_word_embeddings=False))
    assert llama["model.layers.1.self_attn.k_proj.weight"] == (16, 64)
    assert llama["lm_head.weight"] == (512, 64)
    assert not any(name.endswith(".bias") for name in llama)
    phi3 = models.param_shapes(tiny_decoder_only(layout="phi3"))
    assert phi3["model.layers.0.self_attn.qkv_proj.weight"] == (48 + 2 * 16, 64)
    assert phi3["model.layers.0.mlp.gate_up_proj.weight"] == (256, 64)
    assert "lm_head.weight" not in phi3
    mu = models.param_shapes(tiny_decoder_only())
    assert mu["transformer.h.1.mlp.fc1.bias"] == (128,)
    assert not any("cross_attn" in name or ".e." in name for name in mu)


@pytest.mark.parametrize("kind", sorted(ALL_KINDS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logits_shape_dtype_and_float32_close_to_float64(kind, dtype):
    cfg = ALL_KINDS[kind]()
    out = run(models.init(cfg, seed=1, dtype=dtype))
    assert out.shape == (2, DEC.shape[1] if kind == "encoder_decoder" else ENC.shape[1], cfg.vocab_size)
    assert out.dtype == np.dtype(dtype)
    if dtype == "float32":
        np.testing.assert_allclose(out, run(models.init(cfg, seed=1, dtype="float64")), rtol=0, atol=2e-5)


def test_init_is_seeded_and_every_parameter_matters():
    cfg = tiny_encoder_decoder()
    a, b = models.init(cfg, seed=3, dtype="float64"), models.init(cfg, seed=3, dtype="float64")
    assert all(np.array_equal(a.params[n], b.params[n]) for n in a.params)
    base = run(a)
    for name in ["transformer.e.1.attn.q_linear.bias", "transformer.h.0.cross_attn.v_linear.bias",
                 "transformer.ln_e.weight", "transformer.h.0.ln2.weight", "transformer.e.0.mlp.fc2.bias"]:
        params = dict(a.params)
        params[name] = params[name] + 0.1
        assert rel_err(run(models.from_params(cfg, params, dtype="float64")), base) > 1e-6, name


def test_phi3_fused_equals_llama():
    llama_cfg = ALL_KINDS["llama"]()
    llama = models.init(llama_cfg, seed=2, dtype="float64")
    p = llama.params
    fused = {n: a for n, a in p.items() if not any(s in n for s in ("q_proj", "k_proj", "v_proj", "gate_", "up_"))}
    for i in range(llama_cfg.n_layer):
        pre = f"model.layers.{i}"
        fused[f"{pre}.self_attn.qkv_proj.weight"] = np.concatenate(
            [p[f"{pre}.self_attn.{x}_proj.weight"] for x in "qkv"])
        fused[f"{pre}.mlp.gate_up_proj.weight"] = np.concatenate(
            [p[f"{pre}.mlp.gate_proj.weight"], p[f"{pre}.mlp.up_proj.weight"]])
    phi3 = models.from_params(tiny_decoder_only(layout="phi3", is_interleaved=True), fused, dtype="float64")
    np.testing.assert_array_equal(run(phi3), run(llama))


# ---------------------------------------------------------------- masks, positions, GQA order


def test_encoder_padding_does_not_change_outputs():
    model = models.init(tiny_encoder_decoder(), seed=4, dtype="float64")
    padded = np.concatenate([ENC, np.zeros((2, 5), np.int64)], axis=1)  # pad id 0 on the right
    assert rel_err(run(model, padded), run(model)) < 1e-12


def test_padded_rows_match_single_rows():
    model = models.init(tiny_encoder_decoder(), seed=4, dtype="float64")
    short = np.array([[1, 5, 6]])
    batch = np.array([[1, 5, 6, 0, 0, 0], [1, 8, 9, 11, 3, 3]])
    assert rel_err(run(model, batch, DEC)[0], run(model, short, DEC[:1])[0]) < 1e-12


def test_decoder_only_left_padding_with_positions_matches_unpadded():
    for kind in ("mu", "llama"):
        model = models.init(ALL_KINDS[kind](), seed=5, dtype="float64")
        row = np.array([[1, 40, 41, 42]])
        padded = np.array([[0, 0, 1, 40, 41, 42], [1, 7, 8, 9, 10, 11]])
        positions = models.left_padding_positions(padded, 0)
        np.testing.assert_array_equal(positions, [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
        assert rel_err(model.logits(padded, position_ids=positions)[0, 2:], model.logits(row)[0]) < 1e-12
        # positions 0..T-1 shift the row by 2: RoPE scores depend on differences only (rounding aside)
        assert rel_err(model.logits(padded)[0, 2:], model.logits(row)[0]) < 1e-12
        stretched = positions * 2  # not a shift: a different meaning
        assert rel_err(model.logits(padded, position_ids=stretched)[0, 2:], model.logits(row)[0]) > 1e-6


def test_decoder_self_attention_masks_pad_keys():
    """A pad in the decoder input is no key: rewriting the pad's embedding row changes the pad's own
    position, and at every other position only logit column 0 (the pad's row of the tied head)."""
    model = models.init(tiny_encoder_decoder(), seed=6, dtype="float64")
    params = dict(model.params)
    params["transformer.wte.weight"] = params["transformer.wte.weight"].copy()
    params["transformer.wte.weight"][0] = np.random.default_rng(0).normal(size=model.config.n_embd)
    other = models.from_params(model.config, params, dtype="float64")
    enc, dec = ENC[1:], np.array([[1, 20, 0, 22]])  # no pad in the encoder input; a pad key at t=2
    out, changed = run(model, enc, dec), run(other, enc, dec)
    np.testing.assert_array_equal(out[0, [0, 1, 3], 1:], changed[0, [0, 1, 3], 1:])  # t=3 does not see it
    assert rel_err(changed[0, 2, 1:], out[0, 2, 1:]) > 1e-3  # the pad's own query row is its embedding


def test_centred_encoder_positions_equal_uncentred_up_to_rounding(monkeypatch):
    model = models.init(tiny_encoder_decoder(), seed=7, dtype="float64")
    seen = []
    real_rope = model.rope
    monkeypatch.setattr(model, "rope", lambda positions, seq_len: (seen.append(positions), real_rope(positions,
                                                                                                    seq_len))[1])
    centred, uncentred = run(model), run(model, centred_positions=False)
    assert rel_err(centred, uncentred) < 1e-12  # RoPE scores depend on position differences only
    te = ENC.shape[1]
    np.testing.assert_array_equal(seen[0], np.arange(te) - (te - 1) // 2)  # encoder, centred (public Mu)
    np.testing.assert_array_equal(seen[2], np.arange(te))  # encoder, centred_positions=False


def gqa_permuted_params(cfg, params, prefix_q, prefix_o):
    """Block-order params equivalent to interleaved-order ones: block head j = interleaved head perm[j]."""
    hq, hkv, d = cfg.n_head, cfg.n_kv_head, cfg.resolved_head_dim
    rep = hq // hkv
    perm = [(j % hkv) * rep + j // hkv for j in range(hq)]  # kv(block, j) = j % hkv = perm[j] // rep
    rows = np.concatenate([np.arange(h * d, (h + 1) * d) for h in perm])
    out = dict(params)
    out[f"{prefix_q}.weight"] = params[f"{prefix_q}.weight"][rows]
    out[f"{prefix_q}.bias"] = params[f"{prefix_q}.bias"][rows]
    out[f"{prefix_o}.weight"] = params[f"{prefix_o}.weight"][:, rows]
    return out


def test_gqa_order_matters_and_is_a_head_permutation():
    interleaved_cfg = tiny_decoder_only(is_interleaved=True)
    block_cfg = tiny_decoder_only(is_interleaved=False)
    model = models.init(interleaved_cfg, seed=8, dtype="float64")
    same_params_block = models.from_params(block_cfg, model.params, dtype="float64")
    assert rel_err(run(same_params_block), run(model)) > 1e-6
    params = model.params
    for i in range(interleaved_cfg.n_layer):
        pre = f"transformer.h.{i}.causal_attn"
        params = gqa_permuted_params(interleaved_cfg, params, f"{pre}.q_linear", f"{pre}.out_linear")
    assert rel_err(run(models.from_params(block_cfg, params, dtype="float64")), run(model)) < 1e-12


def test_mask_fills_agree_without_fully_masked_rows_and_differ_with():
    finite = models.init(tiny_encoder_decoder(), seed=9, dtype="float64")
    neg_inf = models.from_params(tiny_encoder_decoder(mask_fill="-inf"), finite.params, dtype="float64")
    assert rel_err(run(neg_inf), run(finite)) < 1e-12
    all_pad = np.array([[0, 0, 0], [1, 5, 6]])  # row 0: every encoder key is masked
    a, b = run(finite, all_pad, DEC), run(neg_inf, all_pad, DEC)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    assert rel_err(a[0], b[0]) > 1e-6  # uniform average of the values vs zeros
    assert rel_err(a[1], b[1]) < 1e-12


# ---------------------------------------------------------------- errors


def test_from_params_lists_every_problem():
    cfg = tiny_encoder_decoder()
    params = dict(models.init(cfg, dtype="float64").params)
    del params["transformer.h.0.ln3.weight"]
    params["lm_head.weight"] = params["transformer.wte.weight"]
    params["transformer.e.0.mlp.fc1.weight"] = np.zeros((3, 3))
    with pytest.raises(models.ParameterError) as info:
        models.from_params(cfg, params)
    message = str(info.value)
    assert "missing (1): transformer.h.0.ln3.weight" in message
    assert "unexpected (1): lm_head.weight" in message
    assert "misshaped (1): transformer.e.0.mlp.fc1.weight: expected (128, 64), got (3, 3)" in message


def test_from_params_rejects_integer_arrays():
    cfg = tiny_decoder_only(layout="llama")
    params = {n: np.zeros(s, np.int32) for n, s in models.param_shapes(cfg).items()}
    with pytest.raises(models.ParameterError, match="model.embed_tokens.weight must be a float array, got dtype int32"):
        models.from_params(cfg, params)


@pytest.mark.parametrize("dtype", ["float16", "int32", "bfloat", None])
def test_bad_dtype(dtype):
    with pytest.raises(TypeError, match="dtype must be 'float32' or 'float64'"):
        models.init(tiny_decoder_only(), dtype=dtype)


def test_bad_ids():
    ed = models.init(tiny_encoder_decoder())
    do = models.init(tiny_decoder_only())
    with pytest.raises(ValueError, match=r"input_ids holds token id 512 outside the vocabulary \[0, 512\)"):
        do.logits(np.array([[1, 512]]))
    with pytest.raises(ValueError, match="decoder_input_ids holds token id -1"):
        ed.logits(ENC, np.array([[1, -1]]))
    with pytest.raises(ValueError, match=r"input_ids must have shape \[batch >= 1, time >= 1\], got \(1, 0\)"):
        do.logits(np.zeros((1, 0), np.int64))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        do.logits(np.array([1, 2, 3]))
    with pytest.raises(TypeError, match="input_ids must be an integer array, got dtype float64"):
        do.logits(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="needs decoder_input_ids"):
        ed.logits(ENC)
    with pytest.raises(ValueError, match="decoder-only models take input_ids only"):
        do.logits(ENC, DEC)
    with pytest.raises(ValueError, match="decoder_input_ids batch 1 != input_ids batch 2"):
        ed.logits(ENC, DEC[:1])
    with pytest.raises(ValueError, match="position_ids must have shape"):
        do.logits(ENC, position_ids=np.arange(3))
    with pytest.raises(ValueError, match="position_ids must be >= 0"):
        do.logits(ENC[:, :2], position_ids=np.array([[-1, 0]]))


def test_bad_config_type():
    with pytest.raises(TypeError, match="config must be an EncoderDecoderConfig or DecoderOnlyConfig"):
        models.param_shapes({"n_embd": 4})


# ---------------------------------------------------------------- independent float64 PyTorch checks


def torch_mu_logits(torch, cfg, params, enc_ids, dec_ids):
    """The Mu encoder-decoder written from the reference document (no refslm code), float64."""
    t = {k: torch.from_numpy(v) for k, v in params.items()}
    h, hkv = cfg.n_head, cfg.n_kv_head
    d = cfg.qkv_embd // h

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def lin(x, p):
        return x @ t[p + ".weight"].T + t[p + ".bias"]

    def cos_sin(pos, length):
        base = cfg.rope_theta
        if cfg.rope_factor > 1:
            eff = max(length, cfg.block_size)
            base = base * ((cfg.rope_factor * eff / cfg.block_size) - (cfg.rope_factor - 1)) ** (d / (d - 2))
        inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        freqs = pos.to(torch.float64)[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def rot(x):
        return torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1)

    def attn(p, xq, xkv, allowed, cs):
        b, tq, tk = xq.shape[0], xq.shape[1], xkv.shape[1]
        q = lin(xq, p + ".q_linear").view(b, tq, h, d).transpose(1, 2)
        k = lin(xkv, p + ".k_linear").view(b, tk, hkv, d).transpose(1, 2)
        v = lin(xkv, p + ".v_linear").view(b, tk, hkv, d).transpose(1, 2)
        if cs is not None:
            q, k = q * cs[0] + rot(q) * cs[1], k * cs[0] + rot(k) * cs[1]
        k, v = k.repeat(1, h // hkv, 1, 1), v.repeat(1, h // hkv, 1, 1)  # head j uses kv head j % hkv
        s = (q @ k.transpose(-1, -2)).masked_fill(~allowed, torch.finfo(torch.float64).min) / math.sqrt(d)
        y = torch.softmax(s, dim=-1) @ v
        return lin(y.transpose(1, 2).reshape(b, tq, h * d), p + ".out_linear")

    def mlp(x, p):
        return lin(torch.nn.functional.gelu(lin(x, p + ".fc1"), approximate="tanh"), p + ".fc2")

    enc, dec = torch.from_numpy(enc_ids), torch.from_numpy(dec_ids)
    le, ld = enc.shape[1], dec.shape[1]
    enc_keys = (enc != cfg.pad_token_id)[:, None, None, :]
    x = t["transformer.wte.weight"][enc]
    cs = cos_sin(torch.arange(le) - (le - 1) // 2, le)
    for i in range(cfg.n_encoder_layer):
        p = f"transformer.e.{i}"
        x = x + attn(p + ".attn", rms(x, t[p + ".ln1.weight"]), rms(x, t[p + ".ln1.weight"]), enc_keys, cs)
        x = x + mlp(rms(x, t[p + ".ln2.weight"]), p + ".mlp")
    memory = rms(x, t["transformer.ln_e.weight"])
    causal = torch.tril(torch.ones(ld, ld, dtype=torch.bool))
    dec_allowed = (dec != cfg.pad_token_id)[:, None, None, :] & causal
    cs = cos_sin(torch.arange(ld), ld)
    y = t["transformer.wte.weight"][dec]
    for i in range(cfg.n_decoder_layer):
        p = f"transformer.h.{i}"
        n1 = rms(y, t[p + ".ln1.weight"])
        y = y + attn(p + ".causal_attn", n1, n1, dec_allowed, cs)
        y = y + attn(p + ".cross_attn", rms(y, t[p + ".ln2.weight"]), memory, enc_keys, None)
        y = y + mlp(rms(y, t[p + ".ln3.weight"]), p + ".mlp")
    return (rms(y, t["transformer.ln_f.weight"]) @ t["transformer.wte.weight"].T).numpy()


@pytest.mark.parametrize("overrides", [{}, {"rope_factor": 2.0, "block_size": 4}])
def test_encoder_decoder_matches_independent_torch(overrides):
    torch = pytest.importorskip("torch")
    cfg = tiny_encoder_decoder(**overrides)
    model = models.init(cfg, seed=10, dtype="float64")
    enc = np.array([[1, 5, 6, 7, 9, 0, 0], [1, 8, 9, 11, 3, 3, 4]])
    dec = np.array([[1, 20, 21, 0, 22], [1, 30, 31, 32, 33]])
    expected = torch_mu_logits(torch, cfg, model.params, enc, dec)
    assert rel_err(model.logits(enc, dec), expected) < 1e-12


def hf_config(transformers, cfg, phi3):
    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.hidden_dim,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                  rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_word_embeddings, pad_token_id=cfg.pad_token_id,
                  bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, max_position_embeddings=cfg.block_size)
    if phi3:
        return transformers.Phi3Config(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    return transformers.LlamaConfig(**kwargs, head_dim=cfg.resolved_head_dim,
                                    rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})


@pytest.mark.parametrize("layout", ["llama", "phi3"])
def test_llama_and_phi3_match_hugging_face(layout):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = tiny_decoder_only(layout=layout, is_interleaved=True, qkv_embd=None, n_head=4, n_kv_head=2,
                            tie_word_embeddings=layout == "llama", rope_type="default")
    model = models.init(cfg, seed=11, dtype="float64")
    hf = getattr(transformers, "Phi3ForCausalLM" if layout == "phi3" else "LlamaForCausalLM")(
        hf_config(transformers, cfg, layout == "phi3")).to(torch.float64).eval()
    state = {n: torch.from_numpy(a) for n, a in model.params.items()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    d = cfg.resolved_head_dim

    def rope_float64(x, position_ids):  # HF builds the RoPE angles in float32 even for float64 models
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        emb = (position_ids[..., None].double() * inv_freq).repeat(1, 1, 2)
        return emb.cos(), emb.sin()

    def rmsnorm_float64(module):  # HF normalises in float32 even for float64 models
        return lambda x: module.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)

    hf.model.rotary_emb.forward = rope_float64
    for module in hf.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = rmsnorm_float64(module)
    ids = np.array([[1, 5, 6, 7, 9, 4], [1, 8, 9, 11, 3, 3]])  # no pad id: HF sees no padding either
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits.numpy()
    assert rel_err(model.logits(ids), expected) < 1e-12
    # an attention_mask: row 0 left-padded with filler ids, and the pad id inside both rows marked real
    pad = cfg.pad_token_id
    ids = np.array([[9, 9, 1, 5, pad, 7], [1, 8, pad, 11, 3, 3]])
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = models.left_padding_positions(ids, None, mask)
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(positions)).logits.numpy()
    got = model.logits(ids, position_ids=positions, attention_mask=mask)
    real = mask.astype(bool)  # padded query rows are undefined in HF; compare the real ones
    assert rel_err(got[real], expected[real]) < 1e-12


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("mask_fill", ["finite_min", "-inf"])
def test_grouped_attention_equals_repeated_kv_attention(interleaved, mask_fill):
    """ops.attention groups query heads instead of copying keys; check it against the plain formula."""
    from refslm import ops

    rng = np.random.default_rng(12)
    q, k, v = rng.standard_normal((2, 6, 4, 8)), rng.standard_normal((2, 3, 7, 8)), rng.standard_normal((2, 3, 7, 8))
    key_mask = np.ones((2, 7), bool)
    key_mask[0, :5] = False  # row 0: queries 0..1 see no key under the causal mask (q_start 3)
    got = ops.attention(q, k, v, key_mask=key_mask, causal=True, q_start=3, interleaved=interleaved,
                        mask_fill=mask_fill)
    kr, vr = (ops.repeat_kv(x, 2, interleaved) for x in (k, v))
    allowed = key_mask[:, None, None, :] & (np.arange(7)[None, :] <= 3 + np.arange(4)[:, None])
    fill = np.finfo(np.float64).min if mask_fill == "finite_min" else -np.inf
    scores = np.where(allowed, q @ kr.transpose(0, 1, 3, 2), fill) / np.sqrt(8)
    with np.errstate(invalid="ignore"):
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
    expected = np.nan_to_num(weights) @ vr  # -inf: fully masked rows are zeros
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-15)
    assert mask_fill == "-inf" or np.abs(got[0, :, 0]).min() > 0  # finite_min: uniform average, not zeros


def test_pad_token_none_masks_nothing():
    """A Hugging Face config with pad_token_id null: id 0 is an ordinary token, never a masked key."""
    cfg = tiny_decoder_only(layout="llama", pad_token_id=None)
    model = models.init(cfg, seed=3, dtype="float64")
    ids = np.array([[5, 0, 7, 0]])
    masked = models.init(tiny_decoder_only(layout="llama", pad_token_id=0), seed=3, dtype="float64")
    assert models.key_mask(ids, None) is None
    assert not np.allclose(model.logits(ids), masked.logits(ids))
    # with nothing masked, the last position sees every earlier token: equal to an unmasked id set
    np.testing.assert_allclose(model.logits(ids), models.init(
        tiny_decoder_only(layout="llama", pad_token_id=9), seed=3, dtype="float64").logits(ids), rtol=1e-13)


@pytest.mark.parametrize("kind", ["mu", "llama", "phi3"])
def test_packed_rows_with_segments_equal_each_sequence_alone(kind):
    model = models.init(ALL_KINDS[kind](), seed=3, dtype="float64")
    sequences = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18]]
    ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 0, 0]])  # pad id 0 at the end of row 1
    segment_ids = np.array([[1, 1, 1, 2, 2, 2, 2, 2], [3, 3, 4, 4, 4, 4, 0, 0]])
    position_ids = np.array([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 0, 0]])
    packed = model.logits(ids, position_ids=position_ids, segment_ids=segment_ids)
    alone = np.concatenate([model.logits(np.array([s]))[0] for s in sequences])
    np.testing.assert_allclose(packed[segment_ids > 0], alone, rtol=0, atol=1e-12 * np.abs(alone).max())
    plain = model.logits(ids, position_ids=position_ids)  # without segments the later sequences see the earlier
    assert rel_err(plain[segment_ids > 0], alone) > 1e-3


def test_segment_ids_errors():
    decoder_only = models.init(tiny_decoder_only(), seed=0)
    with pytest.raises(ValueError, match=r"segment_ids must be an integer array of shape \(2, 6\)"):
        decoder_only.logits(ENC, segment_ids=np.ones((2, 5), np.int64))
    with pytest.raises(ValueError, match="position_ids and segment_ids are for decoder-only models"):
        models.init(tiny_encoder_decoder(), seed=0).logits(ENC, DEC, segment_ids=np.ones((2, 4), np.int64))


def test_decode_past_the_start_needs_every_token_for_the_key_mask():
    model = models.init(tiny_decoder_only(), seed=0, dtype="float64")
    with pytest.raises(ValueError, match=r"decode at start=2 needs mask_ids or attention_mask \[B, start\+T\]"):
        model.decode(np.array([[5, 6]]), start=2)


def test_from_params_refuses_non_finite_parameters():
    cfg = tiny_decoder_only(layout="llama")
    params = dict(models.init(cfg, dtype="float64").params)
    params["model.norm.weight"] = params["model.norm.weight"].copy()
    params["model.norm.weight"][3] = 1e300  # finite in float64, inf in float32
    models.from_params(cfg, params, dtype="float64")
    with pytest.raises(models.ParameterError, match=r"norm.weight overflows float32 \(a value of magnitude 1e\+300\)"):
        models.from_params(cfg, params, dtype="float32")
    params["model.norm.weight"][3] = np.nan
    with pytest.raises(models.ParameterError, match="parameter model.norm.weight holds NaN or inf"):
        models.from_params(cfg, params, dtype="float64")


def test_init_seed_is_a_non_negative_int():
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
        models.init(tiny_decoder_only(), seed=-1)
    with pytest.raises(TypeError, match=r"seed must be an int >= 0, got 1.5 \(float\)"):
        models.init(tiny_decoder_only(), seed=1.5)


def test_centred_positions_must_be_a_bool():
    model = models.init(tiny_encoder_decoder(), seed=0, dtype="float64")
    with pytest.raises(TypeError, match="centred_positions must be True or False, got 'no'"):
        model.logits(ENC, DEC, centred_positions="no")


def test_from_params_needs_a_mapping():
    with pytest.raises(TypeError, match="params must be a mapping of parameter names to arrays, got list"):
        models.from_params(tiny_decoder_only(), [np.zeros(3)])


def test_ragged_ids_and_cross_kv_ids_are_named():
    model = models.init(tiny_encoder_decoder(), seed=0, dtype="float64")
    with pytest.raises(ValueError, match=r"input_ids must be a rectangular \[batch, time\] array"):
        model.logits([[5, 6], [7]], [[1], [1]])
    encoded = model.encode(np.array([[5, 6, 7]]))
    with pytest.raises(TypeError, match="input_ids must be an integer array, got dtype float64"):
        model.cross_kv(encoded, np.array([[5.0, 6, 7]]))
    with pytest.raises(ValueError, match=r"input_ids \(1, 2\) must match the encoder output's \[B, Te\] = \(1, 3\)"):
        model.cross_kv(encoded, np.array([[5, 6]]))
