"""KV-cached generation equals recomputation; sampling is seeded, greedy is argmax, top-k / top-p restrict
the support, EOS finishes rows."""

import dataclasses
import re

import numpy as np
import pytest

from refslm import generate, models
from refslm.config import tiny_decoder_only, tiny_encoder_decoder

ENC = np.array([[1, 5, 6, 7, 9, 0, 0], [1, 8, 9, 11, 3, 3, 4]])  # right-padded encoder input
PROMPT = np.array([[0, 0, 1, 40, 41, 42], [1, 7, 8, 9, 10, 11]])  # left-padded decoder-only prompt

CONFIGS = {
    "encoder_decoder": tiny_encoder_decoder(),
    "encoder_decoder_ntk": tiny_encoder_decoder(rope_factor=2.0, block_size=4),
    "mu": tiny_decoder_only(),
    "mu_ntk": tiny_decoder_only(rope_factor=3.0, block_size=8),
    "llama": tiny_decoder_only(layout="llama", is_interleaved=True, tie_word_embeddings=False),
    "phi3_linear_rope": tiny_decoder_only(layout="phi3", rope_type="linear", rope_factor=2.0),
    "llama_inf_mask": tiny_decoder_only(layout="llama", mask_fill="-inf"),
}


def uncached_last_logits(model, inputs, ids):
    """Logits of the last position of ids [B, T], recomputed from scratch."""
    if model.is_encoder_decoder:
        return model.logits(inputs, ids)[:, -1]
    return model.logits(ids, position_ids=models.left_padding_positions(ids, model.config.pad_token_id))[:, -1]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_logits_equal_recomputed(name):
    model = models.init(CONFIGS[name], seed=1, dtype="float64")
    inputs = ENC if model.is_encoder_decoder else PROMPT
    steps = 7  # with block_size 4 / 8 the NTK base changes during decoding
    decoder = generate.CachedDecoder(model, inputs, steps)
    tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(steps, 2))
    tokens[2, 1] = model.config.pad_token_id  # a generated pad is a masked key, in both computations
    for i in range(steps):
        expected = uncached_last_logits(model, inputs, decoder.ids[:, :decoder.length])
        assert np.abs(decoder.logits - expected).max() < 1e-12 * np.abs(expected).max(), f"step {i}"
        decoder.step(tokens[i])
    if "ntk" in name:  # the base really moved, so stale caches would have been caught
        assert model.rope_base(decoder.length) != model.rope_base(1)
    with pytest.raises(ValueError, match=r"capacity \d+ is full"):
        decoder.step(tokens[0])


def test_cached_decoder_with_a_decoder_prefix_and_float32():
    model = models.init(CONFIGS["encoder_decoder"], seed=2, dtype="float32")
    prefix = np.array([[1, 20, 21], [1, 30, 31]])
    decoder = generate.CachedDecoder(model, ENC, 2, decoder_input_ids=prefix)
    assert decoder.logits.dtype == np.float32
    reference = models.init(CONFIGS["encoder_decoder"], seed=2, dtype="float64")
    np.testing.assert_allclose(decoder.logits, reference.logits(ENC, prefix)[:, -1], atol=2e-5, rtol=0)
    got = decoder.step(np.array([5, 6]))
    np.testing.assert_allclose(got, reference.logits(ENC, decoder.ids[:, :4])[:, -1], atol=2e-5, rtol=0)


def test_left_padded_row_generates_like_the_unpadded_row():
    model = models.init(CONFIGS["llama"], seed=3, dtype="float64")
    alone = model.generate(PROMPT[:1, 2:], 5, seed=0, greedy=True)
    in_batch = model.generate(PROMPT, 5, seed=0, greedy=True)
    np.testing.assert_array_equal(in_batch[:1], alone)


def test_encoder_padding_does_not_change_generation():
    model = models.init(CONFIGS["encoder_decoder"], seed=3, dtype="float64")
    alone = model.generate(ENC[:1, :5], 6, seed=0, greedy=True)
    np.testing.assert_array_equal(model.generate(ENC, 6, seed=0, greedy=True)[:1], alone)


@pytest.mark.parametrize("name", ["encoder_decoder", "mu"])
def test_greedy_is_argmax_of_recomputed_logits(name):
    model = models.init(CONFIGS[name], seed=4, dtype="float64")
    inputs = ENC if model.is_encoder_decoder else PROMPT
    out = model.generate(inputs, 5, greedy=True)
    assert out.shape == (2, 5) and out.dtype == np.int64
    prefix = np.full((2, 1), model.config.bos_token_id) if model.is_encoder_decoder else inputs
    for i in range(5):
        np.testing.assert_array_equal(out[:, i], np.argmax(uncached_last_logits(model, inputs, prefix), axis=-1))
        prefix = np.concatenate([prefix, out[:, i:i + 1]], axis=1)


def test_seed_reproduces_and_changes_tokens():
    model = models.init(CONFIGS["encoder_decoder"], seed=5, dtype="float32")
    a = model.generate(ENC, 8, seed=11, temperature=1.5)
    np.testing.assert_array_equal(model.generate(ENC, 8, seed=11, temperature=1.5), a)
    assert not np.array_equal(model.generate(ENC, 8, seed=12, temperature=1.5), a)
    np.testing.assert_array_equal(model.generate(ENC, 8, top_k=1, seed=3), model.generate(ENC, 8, greedy=True))


def test_eos_finishes_rows():
    model = models.init(CONFIGS["mu"], seed=6, dtype="float64")
    free = model.generate(PROMPT, 6, seed=7)
    eos = int(free[0, 2])  # the token row 0 samples at step 2 becomes the end of sequence
    out = model.generate(PROMPT, 6, seed=7, eos_token_id=eos)
    for row in range(2):
        hits = np.flatnonzero(free[row] == eos)
        first = hits[0] if hits.size else 6
        np.testing.assert_array_equal(out[row, :first + 1], free[row, :first + 1])
        assert (out[row, first:] == eos).all()
    assert (out[0, 2:] == eos).all()


def test_generation_stops_when_every_row_is_finished(monkeypatch):
    """Once every row has emitted EOS no further decode step runs; the rest of the output is EOS."""
    model = models.init(CONFIGS["mu"], seed=6, dtype="float64")
    steps = []
    real_step = generate.CachedDecoder.step
    monkeypatch.setattr(generate.CachedDecoder, "step", lambda self, t: (steps.append(t), real_step(self, t))[1])
    free = model.generate(PROMPT, 6, seed=9, top_k=3)
    assert len(steps) == 5  # without EOS: a step after every token but the last
    eos = int(free[1, 2])  # row 1 emits it at step 2, row 0 earlier (the fixture checks it)
    assert np.flatnonzero(free[0] == eos)[:1].tolist() == [1] and eos not in free[1, :2]
    steps.clear()
    out = model.generate(PROMPT, 6, seed=9, top_k=3, eos_token_id=eos)
    assert len(steps) == 2  # steps fed after tokens 0 and 1; after token 2 every row is done
    np.testing.assert_array_equal(out, [[free[0, 0], *[eos] * 5], [*free[1, :2], *[eos] * 4]])


# ---------------------------------------------------------------- sampling


def test_top_k_and_top_p_restrict_the_support():
    rng = np.random.default_rng(0)
    probs = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = np.tile(np.log(probs), (4000, 1))
    assert set(generate.sample_tokens(logits, rng, top_k=2)) == {1, 3}
    assert set(generate.sample_tokens(logits, rng, top_p=0.75)) == {1, 3}  # 0.5 < 0.75 <= 0.8
    assert set(generate.sample_tokens(logits, rng, top_p=0.45)) == {1}
    assert set(generate.sample_tokens(logits, rng, top_p=0.9)) == {1, 3, 2}
    assert set(generate.sample_tokens(logits, rng)) == {0, 1, 2, 3}
    assert set(generate.sample_tokens(logits, rng, top_k=3, top_p=0.9)) == {1, 3, 2}


def test_sampling_frequencies_follow_the_tempered_distribution():
    rng = np.random.default_rng(1)
    n = 40000
    logits = np.tile(np.array([0.0, 1.0, 2.0]), (n, 1))
    temperature = 2.0
    expected = np.exp(np.array([0.0, 0.5, 1.0]))
    expected /= expected.sum()
    counts = np.bincount(generate.sample_tokens(logits, rng, temperature=temperature), minlength=3)
    sigma = np.sqrt(n * expected * (1 - expected))
    assert np.all(np.abs(counts - n * expected) < 5 * sigma)
    # top_k=2 renormalises over the two largest
    kept = expected[1:] / expected[1:].sum()
    counts = np.bincount(generate.sample_tokens(logits, rng, temperature=temperature, top_k=2), minlength=3)
    assert counts[0] == 0 and abs(counts[2] - n * kept[1]) < 5 * np.sqrt(n * kept[0] * kept[1])


def test_greedy_ties_take_the_lowest_id():
    logits = np.array([[0.0, 3.0, 3.0, 1.0]])
    assert generate.sample_tokens(logits, None, greedy=True)[0] == 1
    assert generate.sample_tokens(logits, np.random.default_rng(0), top_k=1)[0] == 1


def test_tiny_temperature_is_the_greedy_limit():
    """z = (logits - row max) / T: as T -> 0 the distribution tends to one-hot at the argmax (uniform over
    tied maxima); dividing first would overflow to inf - inf = NaN and pick garbage."""
    model = models.init(CONFIGS["mu"], seed=0, dtype="float64")
    prompt = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    greedy = model.generate(prompt, 4, greedy=True)
    for temperature in (1e-310, 5e-324, 1e-30):
        np.testing.assert_array_equal(model.generate(prompt, 4, temperature=temperature, seed=3), greedy)
    rng = np.random.default_rng(0)
    tied = np.tile([[1.0, 3.0, 3.0, -np.inf, -1e308]], (4000, 1))
    counts = np.bincount(generate.sample_tokens(tied, rng, temperature=1e-310), minlength=5)
    assert counts[[0, 3, 4]].sum() == 0 and abs(counts[1] - 2000) < 5 * np.sqrt(1000)
    huge = np.array([[1e308, -1e308, -np.inf]])  # the difference overflows to -inf: still no NaN
    assert generate.sample_tokens(huge, rng, temperature=0.5)[0] == 0


@pytest.mark.parametrize("row", [[0.0, np.nan, 1.0], [0.0, np.inf, 1.0], [-np.inf, -np.inf, -np.inf]])
def test_nan_inf_and_all_banned_logits_are_refused(row):
    logits = np.array([[0.0, 1.0, 2.0], row])
    for greedy in (True, False):
        with pytest.raises(ValueError, match="logits row 1 must be finite or -inf with at least one finite entry"):
            generate.sample_tokens(logits, np.random.default_rng(0), greedy=greedy)
    ok = np.array([[0.0, -np.inf, 1.0]])  # -inf bans a token
    assert set(generate.sample_tokens(np.repeat(ok, 200, 0), np.random.default_rng(0))) == {0, 2}


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be"),
    (dict(temperature=True), "temperature must be"),
    (dict(top_k=0), "top_k must be an int >= 1"),
    (dict(top_k=-2), "top_k must be an int >= 1"),
    (dict(top_k=2.5), "top_k must be an int >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=-1.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling_arguments(kwargs, message):
    """generate and sample_tokens apply the same checks (SPEC 4.2); a setting of another type is a TypeError."""
    model = models.init(CONFIGS["mu"])
    error = TypeError if isinstance(kwargs.get("top_k"), float) or kwargs.get("temperature") is True else ValueError
    with pytest.raises(error, match=message):
        model.generate(PROMPT, 2, **kwargs)
    logits = np.random.default_rng(0).standard_normal((2, 6))
    with pytest.raises(error, match=message):
        generate.sample_tokens(logits, np.random.default_rng(0), **kwargs)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator unless greedy"):
        generate.sample_tokens(logits, None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(eos_token_id=512), r"eos_token_id must be an int in \[0, 512\), got 512"),
    (dict(eos_token_id=-1), r"eos_token_id must be an int in \[0, 512\), got -1"),
    (dict(eos_token_id=2.5), r"eos_token_id must be an int in \[0, 512\), got 2.5"),
    (dict(eos_token_id=2.0), r"eos_token_id must be an int in \[0, 512\), got 2.0"),
    (dict(eos_token_id="2"), r"eos_token_id must be an int in \[0, 512\), got '2'"),
    (dict(seed=-1), "seed must be an int >= 0, got -1"),
    (dict(seed=1.5), "seed must be an int >= 0, got 1.5"),
    (dict(seed="a"), "seed must be an int >= 0, got 'a'"),
])
def test_bad_generation_arguments_name_the_argument(kwargs, message):
    model = models.init(CONFIGS["mu"])
    error = ValueError if all(type(v) is int for v in kwargs.values()) else TypeError  # 2.0, '2' are no ints
    with pytest.raises(error, match=message):
        model.generate(PROMPT, 2, **kwargs)


def test_numpy_scalars_are_valid_settings():
    model = models.init(CONFIGS["mu"], seed=1, dtype="float64")
    numpy_args = dict(temperature=np.float32(0.75), top_p=np.float32(0.5), top_k=np.int64(5), seed=np.int64(4),
                      eos_token_id=np.int32(7))
    python_args = {name: value.item() for name, value in numpy_args.items()}
    np.testing.assert_array_equal(model.generate(PROMPT, 4, **numpy_args), model.generate(PROMPT, 4, **python_args))


def test_bad_generation_inputs():
    model = models.init(CONFIGS["encoder_decoder"])
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        model.generate(ENC, 0)
    for bad in (-3, -10, 1.5, None, True):
        with pytest.raises(ValueError if type(bad) is int else TypeError,
                           match=f"max_new_tokens must be an int >= 0, got {bad!r}"):
            generate.CachedDecoder(model, ENC, bad)
    assert generate.CachedDecoder(model, ENC, 0).logits.shape == (2, model.config.vocab_size)  # prefill only
    with pytest.raises(ValueError, match="input_ids holds token id 600"):
        model.generate(np.array([[1, 600]]), 2)
    decoder = generate.CachedDecoder(model, ENC, 2)
    with pytest.raises(ValueError, match=r"token_ids must be an int array of shape \(2,\)"):
        decoder.step(np.array([1]))
    with pytest.raises(ValueError, match="token_ids holds token id 512"):
        decoder.step(np.array([1, 512]))
    with pytest.raises(ValueError, match="decoder-only models take input_ids only"):
        generate.CachedDecoder(models.init(CONFIGS["mu"]), PROMPT, 2, decoder_input_ids=PROMPT)


# ---------------------------------------------------------------- attention_mask (Hugging Face's 0/1 mask)


@pytest.mark.parametrize("name", ["llama", "mu_ntk"])
def test_attention_mask_left_padding_with_any_filler_generates_like_the_unpadded_row(name):
    """With an attention_mask the padding is whatever the mask says: filler ids that are not the pad id
    (and a pad_token_id of None) still drop out, and cached logits equal recomputed ones."""
    cfg = CONFIGS[name]
    model = models.init(dataclasses.replace(cfg, pad_token_id=None), seed=3, dtype="float64")
    prompt = np.array([[77, 78, 1, 40, 41, 42], [1, 7, 8, 9, 10, 11]])  # row 0: two filler tokens
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    alone = model.generate(prompt[:1, 2:], 5, seed=0, greedy=True)
    np.testing.assert_array_equal(model.generate(prompt, 5, seed=0, greedy=True, attention_mask=mask)[:1], alone)
    unmasked = generate.CachedDecoder(model, prompt, 1).logits  # without the mask the fillers count
    assert np.abs(unmasked[0] - generate.CachedDecoder(model, prompt, 1, attention_mask=mask).logits[0]).max() > 1e-6
    decoder = generate.CachedDecoder(model, prompt, 3, attention_mask=mask)
    for token in ([5, 6], [7, 8]):
        decoder.step(np.array(token))
        ids = decoder.ids[:, :decoder.length]
        full_mask = np.concatenate([mask, np.ones((2, ids.shape[1] - mask.shape[1]), int)], axis=1)
        expected = model.logits(ids, position_ids=models.left_padding_positions(ids, None, full_mask),
                                attention_mask=full_mask)[:, -1]
        assert np.abs(decoder.logits - expected).max() < 1e-12 * np.abs(expected).max()


def test_attention_mask_makes_pad_ids_real_tokens_in_prompts_and_generations():
    """Phi-3 names pad = EOS: with an all-ones attention_mask an EOS inside the prompt is attended, and
    so is a generated pad id; the pad-id rule (no mask given) masks both."""
    cfg = CONFIGS["llama"]
    pad = cfg.pad_token_id
    model = models.init(cfg, seed=5, dtype="float64")
    unpadded = models.init(dataclasses.replace(cfg, pad_token_id=None), seed=5, dtype="float64")
    prompt = np.array([[1, 40, pad, 41, 42]])
    ones = np.ones_like(prompt)
    np.testing.assert_array_equal(model.logits(prompt, attention_mask=ones), unpadded.logits(prompt))
    assert np.abs(model.logits(prompt) - unpadded.logits(prompt)).max() > 1e-6
    with_mask = generate.CachedDecoder(model, prompt, 2, attention_mask=ones)
    plain = generate.CachedDecoder(unpadded, prompt, 2)
    np.testing.assert_allclose(with_mask.step(np.array([pad])), plain.step(np.array([pad])), rtol=1e-13, atol=0)


def test_encoder_attention_mask_equals_the_pad_rule_and_overrides_it():
    model = models.init(CONFIGS["encoder_decoder"], seed=6, dtype="float64")
    pad_mask = ENC != model.config.pad_token_id
    np.testing.assert_array_equal(model.generate(ENC, 4, greedy=True, attention_mask=pad_mask),
                                  model.generate(ENC, 4, greedy=True))
    dec = np.array([[1, 20, 21], [1, 30, 31]])
    np.testing.assert_array_equal(model.logits(ENC, dec, attention_mask=pad_mask.astype(np.int64)),
                                  model.logits(ENC, dec))
    ones = np.ones_like(ENC)  # the trailing pad ids of row 0 become real encoder tokens
    assert np.abs(model.logits(ENC, dec, attention_mask=ones) - model.logits(ENC, dec)).max() > 1e-6


@pytest.mark.parametrize("mask,message", [
    (np.ones((2, 5), int), r"attention_mask must have the ids' shape \(2, 6\), got \(2, 5\)"),
    (np.full((2, 6), 2), "attention_mask must hold only 0 and 1"),
    (np.full((2, 6), 0.5), "attention_mask must be an array of bools or of integers 0 / 1, got dtype float64"),
    (np.ones((2, 6)), "attention_mask must be an array of bools or of integers 0 / 1, got dtype float64"),
    (np.array([[1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]), "must mark left padding for cached generation"),
])
def test_bad_attention_mask(mask, message):
    model = models.init(CONFIGS["llama"], seed=1, dtype="float64")
    with pytest.raises(ValueError, match=message):
        model.generate(PROMPT, 2, attention_mask=mask)
    if "left padding" in message:  # a mask with holes is fine for plain logits
        model.logits(PROMPT, attention_mask=mask)


def test_right_padded_decoder_only_prompt_is_refused():
    """Its next-token logits would be read at a pad position (the pad-id rule masks that token)."""
    model = models.init(CONFIGS["mu"], seed=0, dtype="float64")
    with pytest.raises(ValueError, match="input_ids row 0 ends with the pad id 0: decoder-only prompts must be LEFT"):
        model.generate(np.array([[5, 6, 0, 0]]), 2, greedy=True)
    marked = model.generate(np.array([[5, 6, 0]]), 2, greedy=True, attention_mask=np.array([[1, 1, 1]]))
    assert marked.shape == (1, 2)  # with a mask saying so, a final id 0 is a real token


def test_decoder_only_prompt_row_of_padding_only_under_an_attention_mask_is_refused():
    """An all-0 mask row was accepted and its next-token logits depended on the masked filler ids (0.38 apart
    for two fillers); without a mask the same padding-only row already was a ValueError."""
    model = models.init(CONFIGS["mu"], seed=0, dtype="float64")
    prompt = np.array([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    message = r"attention_mask row 1 ends with a 0 \(the row is padding only\)"
    with pytest.raises(ValueError, match=message):
        generate.CachedDecoder(model, prompt, 2, attention_mask=mask)
    with pytest.raises(ValueError, match=message):
        model.generate(prompt, 2, greedy=True, attention_mask=mask.astype(bool))
    with pytest.raises(ValueError, match="input_ids row 1 ends with the pad id 0"):  # the pad-id rule's twin
        model.generate(np.array([[5, 6, 7, 8, 9], [0, 0, 0, 0, 0]]), 2, greedy=True)
    assert model.logits(prompt, attention_mask=mask).shape == (2, 5, 512)  # uncached logits: every row defined (2.6)


def test_encoder_row_of_padding_only_is_defined():
    """An all-masked encoder row is SPEC 2.6's fully masked attention (the decoder still has its BOS to read
    logits at): generation accepts it, with a mask as with the pad-id rule, and the other rows are unchanged."""
    model = models.init(CONFIGS["encoder_decoder"], seed=0, dtype="float64")
    padding_only = np.array([[5, 6, 7, 8, 9], [0, 0, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    with_mask = model.generate(padding_only, 3, greedy=True, attention_mask=mask)
    np.testing.assert_array_equal(with_mask, model.generate(padding_only, 3, greedy=True))
    np.testing.assert_array_equal(with_mask[:1], model.generate(padding_only[:1], 3, greedy=True))


@pytest.mark.parametrize("greedy", ["no", "False", 0, 1, None, np.True_])
def test_greedy_must_be_true_or_false(greedy):
    """greedy="no" was truthy and ran greedy decoding."""
    model = models.init(CONFIGS["mu"])
    message = f"greedy must be True or False, got {greedy!r}"
    with pytest.raises(TypeError, match=re.escape(message)):
        model.generate(PROMPT, 2, greedy=greedy)
    with pytest.raises(TypeError, match=re.escape(message)):
        generate.sample_tokens(np.zeros((2, 4)), np.random.default_rng(0), greedy=greedy)


@pytest.mark.parametrize("logits", [np.zeros(5), np.zeros((2, 0)), np.array([["a", "b"]]), np.zeros((1, 2, 3))])
def test_sampling_needs_a_real_b_by_v_array(logits):
    with pytest.raises(ValueError, match=r"logits must be a real array \[B, V >= 1\]"):
        generate.sample_tokens(logits, np.random.default_rng(0), greedy=True)


def test_a_prompt_may_end_with_the_pad_id_when_it_is_also_eos():
    """Phi-3 names pad = eos: a prompt ending with that (real) EOS is not taken for right padding."""
    model = models.init(tiny_decoder_only(pad_token_id=2, eos_token_id=2), seed=0, dtype="float64")
    assert model.generate(np.array([[5, 6, 2]]), 2, greedy=True).shape == (1, 2)
