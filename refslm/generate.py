"""KV-cached generation and seeded sampling for both model kinds.

`CachedDecoder` is the step API (used by `generate`, the benchmarks and the golden suite):
    dec = CachedDecoder(model, input_ids, max_new_tokens)   # encoder + cross K/V once, prefill
    dec.logits                                               # [B, V] logits of the last position
    dec.step(tokens)                                         # [B] new tokens -> [B, V] next logits
Its logits equal those of `model.logits` over the whole prefix (SPEC.md "Generation"):
  - encoder-decoder: the encoder runs once, each decoder block's cross-attention K/V are computed
    once; the decoder prefix starts with [BOS] (or the given decoder_input_ids), positions 0..T-1.
  - decoder-only: the prompt is LEFT padded with pad ids; token t of row b sits at position
    t - (leading pads of row b) (`models.left_padding_positions`); pad keys are masked.
  - dynamic NTK (rope_type 'dynamic', rope_factor > 1): the RoPE base depends on the length L (max position + 1),
    so once it exceeds block_size every cached key is stale; the decoder then recomputes the whole
    prefix (and refills the cache) whenever the base changes, which keeps the logits exact.
  - longrope: the same recomputation once the length passes rope_original_max_position and the
    long factors replace the short ones (`Model.rope_key` names what the cached keys depend on).
Sampling (`sample_tokens`) draws from an explicit numpy Generator(seed): a seed gives the same tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .models import Model, check_attention_mask, check_ids, leading_pads, rope_length
from .ops import check_bool, check_int, check_number, check_real


class KVCache:
    """One block's self-attention keys and values, preallocated as [B, Hkv, capacity, D] backend arrays."""

    def __init__(self, model: Model, batch: int, capacity: int):
        cfg, be = model.config, model.backend
        shape = (batch, cfg.n_kv_head, capacity, cfg.resolved_head_dim)
        self.backend = be
        self.layout = cfg.rope_layout
        self.k = be.empty(shape, np.dtype(model.dtype))
        self.v = be.empty(shape, np.dtype(model.dtype))

    def update(self, q: Any, k: Any, v: Any, start: int, rope: tuple[np.ndarray, np.ndarray]) -> tuple[Any, Any, Any]:
        """New q [B, Hq, T, D], k/v [B, Hkv, T, D] at times start..start+T-1 (unrotated), rope (cos, sin)
        -> (rotated q, all keys, all values [B, Hkv, start+T, D]): k (rotated) and v are stored
        (Backend.rope_store_kv, one launch on a device)."""
        stop = start + k.shape[-2]
        if stop > self.k.shape[-2]:
            raise ValueError(f"KV cache capacity {self.k.shape[-2]} exceeded (needs {stop})")
        be = self.backend
        q = be.rope_store_kv(q, k, v, *rope, self.layout, self.k, self.v, start)
        return q, be.time_slice(self.k, 0, stop), be.time_slice(self.v, 0, stop)


def check_prompt_ends_real(ids: np.ndarray, mask: np.ndarray | None, pad_token_id: int | None,
                           eos_token_id: int) -> None:
    """Every row of a decoder-only prompt ids [B, T] must end with a real token: its next-token logits are read
    there, and at a masked position they would depend on the masked ids. mask: the checked, left-padded
    attention_mask [B, T] bool, or None for the pad-id rule. With a mask a row ending with a 0 is padding only;
    under the pad-id rule a row ending with the pad id is right padded or padding only (not checked when pad
    is also EOS, as in Phi-3: a real EOS may end it). Raises ValueError naming the first such row."""
    if mask is not None:
        rows = np.flatnonzero(~mask[:, -1])
        if rows.size:
            raise ValueError(f"attention_mask row {rows[0]} ends with a 0 (the row is padding only): a decoder-only "
                             "prompt needs a real token (1) at its end, where its next-token logits are read")
        return
    if pad_token_id in (None, eos_token_id):
        return
    rows = np.flatnonzero(ids[:, -1] == pad_token_id)
    if rows.size:
        raise ValueError(f"input_ids row {rows[0]} ends with the pad id {pad_token_id}: decoder-only prompts must be "
                         "LEFT padded (or give an attention_mask marking that token real)")


class CachedDecoder:
    """Cached decoding of one batch: the constructor runs the encoder (encoder-decoder) and the prefill.

    input_ids: encoder input [B, Te] (encoder-decoder) or LEFT-padded prompt [B, T] (decoder-only).
    max_new_tokens: how many `step` calls the caches must hold, an int >= 0 (0: the prefill only).
    decoder_input_ids: encoder-decoder decoder prefix [B, Td] (default one BOS column).
    attention_mask: [B, Te] or [B, T] of 0/1 for input_ids (Hugging Face's): it replaces the pad-id
    rule; decoder-only prompts must then be left padded (0s, then 1s, with a 1 at the end of every row:
    `check_prompt_ends_real`) and every generated token is attended, whatever its id. After construction
    `logits` [B, V] holds the logits of the last position; `step` appends one token per row and returns the
    next ones.
    """

    def __init__(self, model: Model, input_ids: Any, max_new_tokens: int, decoder_input_ids: Any = None,
                 attention_mask: Any = None):
        cfg = model.config
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
        ids = check_ids("input_ids", input_ids, cfg.vocab_size)
        batch = ids.shape[0]
        self.model = model
        self.cross = None
        self.real = None  # [B, capacity] bool: the tokens attended as keys, when an attention_mask is given
        if model.is_encoder_decoder:
            if decoder_input_ids is None:
                decoder_input_ids = np.full((batch, 1), cfg.bos_token_id, dtype=np.int64)
            prefix = check_ids("decoder_input_ids", decoder_input_ids, cfg.vocab_size)
            if prefix.shape[0] != batch:
                raise ValueError(f"decoder_input_ids batch {prefix.shape[0]} != input_ids batch {batch}")
            self.cross = model.cross_kv(model.encode(ids, attention_mask=attention_mask), ids, attention_mask)
            self.offset = np.zeros((1, 1), dtype=np.int64)
        else:
            if decoder_input_ids is not None:
                raise ValueError("decoder-only models take input_ids only, not decoder_input_ids")
            prefix = ids
            mask = check_attention_mask(attention_mask, ids.shape, left_padded=True)
            check_prompt_ends_real(ids, mask, cfg.pad_token_id, cfg.eos_token_id)
            self.offset = leading_pads(ids, cfg.pad_token_id, mask)[:, None]
            if mask is not None:
                self.real = np.ones((batch, ids.shape[1] + max_new_tokens), dtype=bool)
                self.real[:, :ids.shape[1]] = mask
        capacity = prefix.shape[1] + max_new_tokens
        self.ids = np.zeros((batch, capacity), dtype=np.int64)  # every token so far (unwritten tail unused)
        self.ids[:, :prefix.shape[1]] = prefix
        self.length = prefix.shape[1]
        self.caches = [KVCache(model, batch, capacity) for _ in model.weights.blocks]
        self.logits = self._run(0)

    def _positions(self, start: int, stop: int) -> np.ndarray:
        """[B, stop-start] positions of times start..stop-1 (t - leading pads, never below 0)."""
        return np.maximum(np.arange(start, stop)[None, :] - self.offset, 0)

    def _rope_key(self) -> tuple[float, bool]:
        """What the RoPE tables of the prefix depend on (Model.rope_key of L = max position + 1)."""
        return self.model.rope_key(rope_length(self._positions(self.length - 1, self.length)))

    def _run(self, start: int) -> np.ndarray:
        """Run the decoder over times start..length-1 (caches hold 0..start-1) -> [B, V] last logits."""
        self.rope_key = self._rope_key()
        logits = self.model.decode(self.ids[:, start:self.length], positions=self._positions(start, self.length),
                                   mask_ids=self.ids[:, :self.length],
                                   attention_mask=None if self.real is None else self.real[:, :self.length],
                                   start=start, caches=self.caches, cross=self.cross, last_only=True)
        return logits[:, -1]

    def step(self, token_ids: Any) -> np.ndarray:
        """[B] int next tokens -> [B, V] logits of the position after them (all recomputed if the RoPE
        tables changed with the length: NTK base, longrope factors)."""
        tokens = np.asarray(token_ids)
        if tokens.shape != (self.ids.shape[0],) or tokens.dtype.kind not in "iu":
            raise ValueError(f"token_ids must be an int array of shape ({self.ids.shape[0]},), got "
                             f"{tokens.dtype} {tokens.shape}")
        check_ids("token_ids", tokens[:, None], self.model.config.vocab_size)
        if self.length >= self.ids.shape[1]:
            raise ValueError(f"CachedDecoder capacity {self.ids.shape[1]} is full")
        self.ids[:, self.length] = tokens
        self.length += 1
        stale = self._rope_key() != self.rope_key
        self.logits = self._run(0 if stale else self.length - 1)
        return self.logits


# ---------------------------------------------------------------- sampling


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the argument unless temperature is finite > 0, top_k an int >= 1 and
    0 < top_p <= 1 (Python or NumPy scalars; top_k and top_p may be None); a TypeError for a setting of
    another type (ops.check_number / check_int / check_real)."""
    check_number("temperature", temperature)
    if top_k is not None:
        check_int("top_k", top_k, 1)
    if top_p is not None and not 0 < check_real("top_p", top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def check_logits(logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """[B, V] real logits -> (logits, [B] row maxima). ValueError unless every row is finite or -inf
    with at least one finite entry (NaN, +inf or an all -inf row would make the token meaningless)."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 1 or logits.dtype.kind not in "fiu":
        raise ValueError(f"logits must be a real array [B, V >= 1], got {logits.dtype} {logits.shape}")
    row_max = logits.max(axis=-1)  # NaN if the row holds one, +inf, or -inf for an all -inf row
    bad = np.flatnonzero(~np.isfinite(row_max))
    if bad.size:
        raise ValueError(f"logits row {bad[0]} must be finite or -inf with at least one finite entry "
                         "(found NaN, +inf or only -inf)")
    return logits, row_max


def sample_tokens(logits: np.ndarray, rng: np.random.Generator | None, *, greedy: bool = False,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """[B, V] logits -> [B] int64 tokens.

    Logits must be finite or -inf with a finite entry per row (`check_logits`), the settings pass
    `check_sampling`. greedy (True or False, else TypeError): argmax (lowest id on ties; rng unused).
    Otherwise, in float64:
    z = (logits - row max) / temperature, which cannot overflow to NaN: as temperature -> 0 it
    tends to 0 on the row's maxima and -inf elsewhere, i.e. uniform over the tied maxima (greedy
    when there is one). Tokens sorted by z descending (ties: lower id first); keep the first top_k;
    p = softmax over the kept; top_p keeps the shortest prefix whose mass reaches top_p (the first
    token always); then u = rng.random(B) picks, per row, the first kept token whose cumulative
    mass exceeds u * (kept mass).
    """
    logits, row_max = check_logits(logits)
    if check_bool("greedy", greedy):
        return np.argmax(logits, axis=-1).astype(np.int64)
    check_sampling(temperature, top_k, top_p)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator unless greedy, got {type(rng).__name__}")
    with np.errstate(over="ignore"):  # overflow to -inf is the limit (probability 0), never NaN
        z = (logits.astype(np.float64) - row_max[:, None].astype(np.float64)) / float(temperature)
    order = np.argsort(-z, axis=-1, kind="stable")
    if top_k is not None:
        order = order[:, :top_k]
    p = np.exp(np.take_along_axis(z, order, axis=-1))  # the first z is 0: p[:, 0] == 1
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1:
        p = np.where(np.cumsum(p, axis=-1) - p < top_p, p, 0.0)
    cumulative = np.cumsum(p, axis=-1)
    u = rng.random(p.shape[0])
    index = np.sum(cumulative <= (u * cumulative[:, -1])[:, None], axis=-1)
    index = np.minimum(index, np.sum(p > 0, axis=-1) - 1)  # u * mass rounding up to the mass
    return order[np.arange(p.shape[0]), index].astype(np.int64)


def generate(model: Model, input_ids: Any, max_new_tokens: int, *, greedy: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_token_id: int | None = None, attention_mask: Any = None) -> np.ndarray:
    """New tokens [B, max_new_tokens] int64 (no BOS), KV-cached.

    input_ids: encoder input (encoder-decoder; the decoder starts from BOS) or LEFT-padded prompt
    (decoder-only); attention_mask: see CachedDecoder. Each step samples with `sample_tokens` from
    Generator(seed), seed an int >= 0. eos_token_id, an int in [0, vocab_size): a row that has
    emitted it keeps emitting it; generation stops early once every row has (the rest of the output
    is EOS). None: no stopping (pass model.config.eos_token_id to stop at the model's EOS).
    """
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    if not check_bool("greedy", greedy):
        check_sampling(temperature, top_k, top_p)
    if eos_token_id is not None:
        eos_token_id = check_int("eos_token_id", eos_token_id, 0, model.config.vocab_size)
    rng = np.random.default_rng(check_int("seed", seed, 0))
    decoder = CachedDecoder(model, input_ids, max_new_tokens, attention_mask=attention_mask)
    batch = decoder.ids.shape[0]
    out = np.empty((batch, max_new_tokens), dtype=np.int64)
    finished = np.zeros(batch, dtype=bool)
    for i in range(max_new_tokens):
        tokens = sample_tokens(decoder.logits, rng, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
        if eos_token_id is not None:
            tokens = np.where(finished, eos_token_id, tokens)
            finished |= tokens == eos_token_id
        out[:, i] = tokens
        if eos_token_id is not None and finished.all():
            out[:, i + 1:] = eos_token_id
            break
        if i + 1 < max_new_tokens:
            decoder.step(tokens)
    return out
