"""Cross-tokenizer alignment: hand-derived alignments (offsets given by hand, then real tokenizers
trained from tests/data), the character-coverage invariants, vocabulary pairs and bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refslm import align
from refslm import token_align as ta

pytest.importorskip("tokenizers")
from align_tokenizers import bpe_tokenizer, wordpiece_tokenizer  # noqa: E402

PHI35 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "phi35-tokenizer.json"


# ---------------------------------------------------------------- pure pieces


def test_levenshtein_hand_values():
    assert ta.levenshtein("kitten", "sitting") == 3
    assert ta.levenshtein("", "abc") == 3
    assert ta.levenshtein(b"\xf0", b"\xf0\x9f\x98\x80") == 3
    assert ta.levenshtein("bel", "eliev") == 4  # drop b, keep "el", add "iev"


def test_dtw_path_hand_case():
    # totals: D00=2, D01=6, D10=5, D11=2+min(2,6,5)=4 -> the diagonal
    assert ta.dtw_path(np.array([[2.0, 4.0], [3.0, 2.0]])) == [(0, 0), (1, 1)]
    # one row against three columns: every column is visited
    assert ta.dtw_path(np.array([[1.0, 0.0, 5.0]])) == [(0, 0), (0, 1), (0, 2)]


def test_token_units_group_shared_starts_and_absorb_gaps():
    # Phi-3.5 on " lead": "▁" (0,1) and "▁lead" (0,5) start together; a tokenizer that skips the
    # space before "b" in "a b" (offsets (0,1), (2,3)) gives the space to the unit before.
    unit_of, spans = ta.token_units(np.array([[0, 1], [0, 5]]), 5)
    np.testing.assert_array_equal(unit_of, [0, 0])
    np.testing.assert_array_equal(spans, [[0, 5]])
    unit_of, spans = ta.token_units(np.array([[0, 1], [2, 3]]), 3)
    np.testing.assert_array_equal(spans, [[0, 2], [2, 3]])
    with pytest.raises(ValueError, match="must not decrease"):
        ta.token_units(np.array([[2, 3], [0, 1]]), 3)
    with pytest.raises(ValueError, match=r"offsets must satisfy 0 <= start <= end <= 3"):
        ta.token_units(np.array([[0, 4]]), 3)


@pytest.mark.parametrize("offsets, message", [
    ([[2, 1]], r"0 <= start <= end <= 3, got \[\[2, 1\]\]"),  # end before start
    ([[0, -1]], r"0 <= start <= end <= 3"),
    ([[-1, 1]], r"0 <= start <= end <= 3"),
    ([[0.0, 1.5]], r"token offsets must be an integer array \[n, 2\], got float64 \(1, 2\)"),
    ([0, 1, 1, 2], r"token offsets must be an integer array \[n, 2\], got int64 \(4,\)"),
])
def test_token_units_refuse_bad_offsets(offsets, message):
    with pytest.raises(ValueError, match=message):
        ta.token_units(np.array(offsets), 3)
    with pytest.raises(ValueError, match="text_length must be an int >= 0, got -1"):
        ta.token_units(np.array([[0, 0]]), -1)


def test_align_offsets_refuses_bad_text_surfaces_and_empty_shapes():
    one = np.array([[0, 2]])
    with pytest.raises(ValueError, match="text must be a non-empty string, got ''"):
        ta.align_offsets("", np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64), [], [])
    with pytest.raises(ValueError, match=r"student_surfaces must be 1 bytes strings, one per token, got \['str'\]"):
        ta.align_offsets("ab", one, one, ["ab"], [b"ab"])
    with pytest.raises(ValueError, match=r"teacher_surfaces must be 1 bytes strings, one per token, got \[\] \(0\)"):
        ta.align_offsets("ab", one, one, [b"ab"], [])
    with pytest.raises(ValueError, match=r"token offsets must be an integer array \[n, 2\], got float64 \(0, 3\)"):
        ta.token_units(np.zeros((0, 3)), 3)


def test_no_tokens_give_no_units_and_no_alignment():
    for empty in ([], np.zeros((0, 2), np.int64)):
        unit_of, spans = ta.token_units(empty, 3)
        assert unit_of.shape == (0,) and spans.shape == (0, 2) and unit_of.dtype == spans.dtype == np.int64
    result = ta.align_offsets("ab", np.zeros((0, 2), np.int64), np.array([[0, 2]]), [], [b"ab"])
    assert result.teacher_index.shape == (0,) and result.kind == () and result.blocks == ()


def test_token_bytes_byte_fallback_metaspace_and_byte_level():
    assert ta.token_bytes("<0xF0>", byte_level=False) == b"\xf0"
    assert ta.token_bytes("▁hello", byte_level=False) == b" hello"
    assert ta.token_bytes("Ġworld", byte_level=True) == b" world"
    # GPT-2 ByteLevel pieces of U+1F600: F0 9F 98 80
    assert ta.token_bytes("ðŁĺĢ", byte_level=True) == "😀".encode()


def test_align_offsets_split_versus_merged_by_hand():
    # "hello world": student "▁hello" "▁world"; teacher "▁he" "llo" "▁wor" "ld".
    # Shared unit starts 0 and 5 make two blocks. Block 1: lev(" hello", " he") = 3 = lev(" hello", "llo")
    # -> tie -> first teacher token 0. Block 2: lev(" world", " wor") = 2 < lev(" world", "ld") = 4 -> 2.
    result = ta.align_offsets(
        "hello world",
        np.array([[0, 5], [5, 11]]),
        np.array([[0, 2], [2, 5], [5, 9], [9, 11]]),
        [b" hello", b" world"],
        [b" he", b"llo", b" wor", b"ld"],
    )
    np.testing.assert_array_equal(result.teacher_index, [0, 2])
    assert result.kind == ("many:1", "many:1")
    assert result.blocks == ((0, 1, 0, 2), (1, 2, 2, 4))


def test_align_offsets_zero_width_tail_is_unaligned():
    result = ta.align_offsets("ab", np.array([[0, 1], [1, 2], [2, 2]]), np.array([[0, 2]]), [b"a", b"b", b""], [b"ab"])
    np.testing.assert_array_equal(result.teacher_index, [0, 0, -1])
    assert result.kind == ("many:1", "many:1", "unaligned")


# ---------------------------------------------------------------- real tokenizers, hand-checked


def aligned(text):
    return ta.align_text(text, bpe_tokenizer(), wordpiece_tokenizer())


def test_whitespace_run_is_one_to_one():
    a = aligned("a   b")
    assert a.student_tokens == a.teacher_tokens == ("▁a", "▁", "▁", "▁b")
    np.testing.assert_array_equal(a.teacher_index, [0, 1, 2, 3])
    assert a.kind == ("1:1",) * 4


def test_digits_split_differently():
    a = aligned("12345 and 2025")
    assert a.student_tokens == ("▁1", "2", "34", "5", "▁and", "▁2", "02", "5")
    assert a.teacher_tokens == ("▁1", "2", "3", "4", "5", "▁and", "▁2", "02", "5")
    # "34" against "3" and "4": both at distance 1, the first wins; everything else is the same span.
    np.testing.assert_array_equal(a.teacher_index, [0, 1, 2, 4, 5, 6, 7, 8])
    assert a.kind == ("1:1", "1:1", "many:1", "1:1", "1:1", "1:1", "1:1", "1:1")


def test_emoji_byte_fallback_pieces_share_the_teacher_token():
    a = aligned("x😀y")
    assert a.student_tokens == ("▁", "x", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "y")
    assert a.teacher_tokens == ("▁", "x", "😀", "y")
    # "▁" and "x" share one unit on both sides and match token by token; the four bytes of the emoji
    # all go to the teacher's emoji token (lev = 3 each, first wins).
    np.testing.assert_array_equal(a.teacher_index, [0, 1, 2, 2, 2, 2, 3])
    assert a.kind == ("1:1", "1:1", "many:1", "many:1", "many:1", "many:1", "1:1")
    np.testing.assert_array_equal(a.alignment.student_spans[2:6], [[1, 2]] * 4)


def test_merged_word_against_pieces():
    a = aligned("unbelievable")
    assert a.student_tokens == ("▁un", "bel", "iev", "able")
    assert a.teacher_tokens == ("▁un", "b", "eliev", "ab", "le")
    # block "believ": lev(bel,b)=2, lev(bel,eliev)=4, lev(iev,b)=3, lev(iev,eliev)=2 -> diagonal;
    # block "able": lev(able,ab) = lev(able,le) = 2 -> first.
    np.testing.assert_array_equal(a.teacher_index, [0, 1, 2, 3])
    assert a.kind == ("1:1", "many:1", "many:1", "many:1")
    assert a.alignment.blocks == ((0, 1, 0, 1), (1, 3, 1, 3), (3, 4, 3, 5))


def test_tab_byte_fallback_matches_the_teacher_tab():
    a = aligned("tab\there")
    assert a.student_tokens == ("▁t", "ab", "<0x09>", "he", "re")
    assert a.teacher_tokens == ("▁tab", "\t", "here")
    np.testing.assert_array_equal(a.teacher_index, [0, 0, 1, 2, 2])
    assert a.kind == ("many:1", "many:1", "1:1", "many:1", "many:1")


def check_invariants(a: ta.TokenAlignment) -> None:
    """Blocks tile both token sequences and the text; every pair lies in one block; 1:1 = same span."""
    r = a.alignment
    for spans in (r.student_spans, r.teacher_spans):
        units = np.unique(spans, axis=0)
        assert units[0, 0] == 0 and units[-1, 1] == len(a.text)
        np.testing.assert_array_equal(units[1:, 0], units[:-1, 1])  # units tile the text
    assert [b[0] for b in r.blocks] == [0] + [b[1] for b in r.blocks[:-1]]
    assert [b[2] for b in r.blocks] == [0] + [b[3] for b in r.blocks[:-1]]
    assert r.blocks[-1][3] == len(a.teacher_ids)
    for s_lo, s_hi, t_lo, t_hi in r.blocks:
        s_chars = (r.student_spans[s_lo:s_hi, 0].min(), r.student_spans[s_lo:s_hi, 1].max())
        t_chars = (r.teacher_spans[t_lo:t_hi, 0].min(), r.teacher_spans[t_lo:t_hi, 1].max())
        assert s_chars == t_chars  # the block's tokens cover the same characters on both sides
        for s in range(s_lo, s_hi):
            assert t_lo <= r.teacher_index[s] < t_hi
    for s, kind in enumerate(r.kind):
        if kind == "1:1":
            np.testing.assert_array_equal(r.student_spans[s], r.teacher_spans[r.teacher_index[s]])
    assert (r.teacher_index[np.array(r.kind) != "unaligned"] >= 0).all()


ALPHABET = "abcdehilnorstuw 012345,.:😀\t"  # characters the WordPiece tokenizer knows


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.text(alphabet=ALPHABET, min_size=1, max_size=30).filter(lambda s: not s[0].isspace()))
def test_invariants_on_random_text(text):
    check_invariants(aligned(text))


# ---------------------------------------------------------------- index map for the losses


def prefix_code(tokens) -> float:
    code = len(tokens)
    for tok in tokens:
        code = (code * 1_000_003 + int(tok)) % 2_147_483_647
    return float(code)


def test_cross_tokenizer_index_map_points_at_the_teacher_prefix():
    source_text, target_text = "the teacher reads", "unbelievable 2025 😀"
    student, teacher = bpe_tokenizer(), wordpiece_tokenizer()
    a = ta.align_text(target_text, student, teacher)
    teacher_source = teacher.encode(source_text, add_special_tokens=False).ids
    batch = align.right_padded_teacher_batch([teacher_source], [a.teacher_ids], pad_id=0, length=40)
    decoder_len = len(a.student_ids) + 2
    token_of = ta.teacher_token_of([a], decoder_len)
    positions, valid = align.index_map(batch, decoder_len, token_of)
    # a fake teacher whose logit at position p encodes the tokens it has seen (ids are never 0 = pad here)
    codes = np.array([[[prefix_code(batch.input_ids[0, : p + 1])] for p in range(40)]])
    gathered = align.gather_teacher_logits(codes, positions, valid)
    for i, j in enumerate(a.teacher_index):
        assert valid[0, i]
        assert gathered[0, i, 0] == prefix_code(list(teacher_source) + list(a.teacher_ids[:j]))
    assert not valid[0, len(a.student_ids) :].any()
    only_exact = ta.teacher_token_of([a], decoder_len, kinds=("1:1",))
    np.testing.assert_array_equal(only_exact[0, : len(a.kind)] >= 0, np.array(a.kind) == "1:1")


def test_teacher_token_of_errors():
    a = aligned("a   b")
    with pytest.raises(ValueError, match="more than decoder_len=3"):
        ta.teacher_token_of([a], 3)
    with pytest.raises(ValueError, match="kinds must be taken from"):
        ta.teacher_token_of([a], 8, kinds=("exact",))
    for bad in (-1, 0, 2.0):
        with pytest.raises(ValueError if type(bad) is int else TypeError,
                           match=f"decoder_len must be an int >= 1, got {bad!r}"):
            ta.teacher_token_of([], bad)


# ---------------------------------------------------------------- vocabulary pairs


def test_shared_vocab_pairs_match_bytes():
    student, teacher = bpe_tokenizer(), wordpiece_tokenizer()
    pairs = ta.shared_vocab_pairs(student, teacher)
    as_dict = dict(pairs.tolist())
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    assert as_dict[s_vocab["▁the"]] == t_vocab["▁the"]
    assert as_dict[s_vocab["<0x09>"]] == t_vocab["\t"]  # byte-fallback tab = the teacher's tab token
    assert s_vocab["<0x41>"] not in as_dict  # "A" alone is not in the teacher's vocabulary
    vmap = align.vocab_map(student.get_vocab_size(), teacher.get_vocab_size(), id_pairs=pairs)
    assert len(vmap.student_ids) == len(pairs)


# ---------------------------------------------------------------- bad input


def test_decoded_texts_that_differ_are_an_error():
    # the WordPiece decoder drops a leading space; an unknown emoji becomes <unk>
    with pytest.raises(ValueError, match="decode ' lead' differently: student ' lead', teacher 'lead'"):
        aligned(" lead")
    with pytest.raises(ValueError, match="decode .* differently"):
        aligned("hi 🙂")


def test_empty_text_and_missing_file():
    with pytest.raises(ValueError, match="non-empty string"):
        aligned("")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ta.align_text("x", "/nonexistent/tokenizer.json", wordpiece_tokenizer())


def test_text_without_tokens_is_an_error():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # drops whitespace: "   " has no tokens
    with pytest.raises(ValueError, match="the student tokenizer encodes '   ' to no tokens"):
        ta.align_text("   ", words, words)
    with pytest.raises(ValueError, match="the teacher tokenizer encodes '   ' to no tokens"):
        ta.align_text("   ", bpe_tokenizer(), words)


def test_unreadable_tokenizer_paths_name_the_path(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"{str(tmp_path)!r} is a directory, not a tokenizer.json file"):
        ta.load_tokenizer(tmp_path)
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{ not json")
    with pytest.raises(ValueError, match=f"tokenizer file {str(broken)!r} is not a valid tokenizer.json"):
        ta.load_tokenizer(str(broken))


def test_missing_tokenizers_package_is_a_clear_error(monkeypatch):
    code = "import sys; sys.modules['tokenizers'] = None; import refslm.token_align, refslm.align; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.stdout.strip() == "ok", done.stderr  # both modules import without tokenizers
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"needs the optional package 'tokenizers': pip install 'refslm\[io\]'"):
        ta.load_tokenizer("any.json")


# ---------------------------------------------------------------- the paper's tokenizer (when present)


@pytest.mark.skipif(not PHI35.is_file(), reason="Phi-3.5 tokenizer not present in ../shared/data")
def test_phi35_teacher_against_the_bpe_student():
    from tokenizers import Tokenizer

    phi = Tokenizer.from_file(str(PHI35))
    a = ta.align_text("x😀y", bpe_tokenizer(), phi)
    assert a.teacher_tokens == ("▁x", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "y")
    # "▁" "x" (student) against "▁x": one block, lev(" ", " x") = 1 = lev("x", " x") -> both to "▁x";
    # the four bytes match byte for byte (lev 0 on the diagonal) over the same span: 1:1.
    np.testing.assert_array_equal(a.teacher_index, [0, 0, 1, 2, 3, 4, 5])
    assert a.kind == ("many:1", "many:1", "1:1", "1:1", "1:1", "1:1", "1:1")
    for text in ("123 4567", "a   b", "tab\there\nnew line", "Distillation moves knowledge 😀😀"):
        check_invariants(ta.align_text(text, bpe_tokenizer(), phi))
    pairs = dict(ta.shared_vocab_pairs(bpe_tokenizer(), phi).tolist())
    assert pairs[bpe_tokenizer().token_to_id("<0xF0>")] == 243
    assert pairs[bpe_tokenizer().token_to_id("▁")] == 29871  # the regular "▁" wins over <0x20>


def test_dtw_ties_prefer_the_diagonal_then_advancing_i():
    """SPEC 7: among equal totals the backtrack steps to (i-1, j-1), then (i-1, j), then (i, j-1)."""
    assert ta.dtw_path(np.zeros((2, 2))) == [(0, 0), (1, 1)]  # all three predecessors tie at (1, 1)
    assert ta.dtw_path(np.zeros((3, 2))) == [(0, 0), (1, 0), (2, 1)]  # from (2, 1): diagonal (1, 0) first
    assert ta.dtw_path(np.array([[0.0, 0.0], [0.0, 9.0], [0.0, 0.0]])) == [(0, 0), (1, 0), (2, 1)]


@pytest.mark.parametrize("cost", [np.zeros(3), np.zeros((0, 2)), np.array([[0.0, np.nan]])])
def test_dtw_path_needs_a_finite_matrix(cost):
    with pytest.raises(ValueError, match=r"dtw_path cost must be a finite \[n >= 1, m >= 1\] array"):
        ta.dtw_path(cost)
