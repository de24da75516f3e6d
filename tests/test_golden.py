"""The golden suite: refslm matches every PyTorch golden, and `refslm verify` catches what it must.

Expected numbers come from golden/generate.py (PyTorch / transformers, float64), never from refslm;
the wrong implementations below are built deliberately and must be reported as failures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refslm import golden, ops
from refslm.cli import main
from refslm.resources import golden_dir

REPO = Path(__file__).resolve().parent.parent
CASES = golden.load_manifest()
BY_NAME = {c.name: c for c in CASES}


def case(name: str) -> golden.GoldenCase:
    return BY_NAME[name]


def write_outputs(directory: Path, name: str, outputs: dict[str, np.ndarray]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / f"{name}.npz", **outputs)


def expected_outputs(c: golden.GoldenCase) -> dict[str, np.ndarray]:
    tensors = golden.load_case(c)
    return {n: tensors[n] for n in c.outputs}


def statuses(results: list[golden.Result]) -> set[str]:
    return {r.status for r in results}


# ------------------------------------------------------------------ the suite itself


def test_manifest_is_complete_and_files_match_hashes():
    kinds = {c.kind for c in CASES}
    assert {"op", "model", "loss", "loss_rows", "generate", "align"} <= kinds
    total = 0
    for c in CASES:
        assert golden.hash_problem(c) is None, c.name
        tensors = golden.load_case(c)
        for name, value in tensors.items():
            assert value.dtype in (np.float64, np.int64), (c.name, name, value.dtype)
            assert list(value.shape) == c.shapes[name], (c.name, name)
            assert value.dtype == c.dtypes[name], (c.name, name)
        assert set(c.dtypes) == set(tensors) == set(c.shapes), c.name
        for output in c.outputs:
            tol = c.tolerances[output]
            if not tol.get("exact"):
                assert tol["float64"]["rtol"] <= 1e-11, (c.name, output)  # float64 stays near 1e-12 relative
                scale = np.abs(tensors[output]).max()
                assert tol["float64"]["atol"] <= 5e-12 * max(scale, 1.0), (c.name, output)  # and near 1e-12 of it
                assert tol["float32"]["rtol"] >= tol["float64"]["rtol"]
        total += c.path.stat().st_size
    assert total < 20e6


def test_generator_never_imports_refslm():
    source = (REPO / "golden" / "generate.py").read_text()
    assert "import refslm" not in source and "from refslm" not in source


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_numpy_reference_matches_golden(name):
    results = golden.verify_backends([case(name)], ["numpy"], golden.DTYPES)
    assert results and all(r.passed for r in results), golden.format_table(results)
    for r in results:
        if r.dtype == "float64" and r.max_rel_err is not None:
            assert r.max_rel_err <= 1e-11, (r.output, r.max_rel_err)


# ------------------------------------------------------------------ comparison rule


def test_compare_rule_by_hand():
    expected = np.array([1.0, -2.0, 0.0, -np.inf])
    ok = golden.compare(expected, np.array([1.0 + 1.5e-6, -2.0, 1e-6, -np.inf]), (1e-6, 1e-6))
    assert ok["status"] == golden.OK  # |d| = 1.5e-6 <= 1e-6 + 1e-6 * 1
    bad = golden.compare(expected, np.array([1.0 + 2.5e-6, -2.0, 0.0, -np.inf]), (1e-6, 1e-6))
    assert bad["status"] == golden.NOT_OK and bad["worst"] == {"index": [0], "expected": 1.0, "got": 1.0 + 2.5e-6}
    inf = golden.compare(expected, np.array([1.0, -2.0, 0.0, -1e30]), (1e-6, 1e-6))
    assert inf["status"] == golden.NONFINITE and inf["worst"]["index"] == [3]
    exact = golden.compare(np.array([3, 4]), np.array([3, 5]), None)
    assert exact["status"] == golden.NOT_OK and exact["max_abs_err"] == 1.0


# ------------------------------------------------------------------ another implementation's outputs


def test_correct_outputs_pass_in_both_dtypes(tmp_path):
    names = ["op_linear_bias", "model_ed_gqa_block", "loss_kd_paper", "generate_ed_greedy"]
    for name in names:
        write_outputs(tmp_path, name, expected_outputs(case(name)))
    results = golden.verify_outputs([case(n) for n in names], tmp_path)
    assert all(r.passed for r in results) and {r.dtype for r in results} == {"float64"}
    for name in names:
        write_outputs(tmp_path, name, {k: (v.astype(np.float32) if v.dtype.kind == "f" else v)
                                       for k, v in expected_outputs(case(name)).items()})
    results = golden.verify_outputs([case(n) for n in names], tmp_path)
    assert all(r.passed for r in results) and "float32" in {r.dtype for r in results}


def attention_inputs(c: golden.GoldenCase) -> dict:
    t = golden.load_case(c)
    a = c.attributes
    mask = t.get("input.key_mask")
    return dict(q=t["input.q"], k=t["input.k"], v=t["input.v"], key_mask=None if mask is None else mask.astype(bool),
                causal=a["causal"], q_start=a["q_start"], interleaved=a["interleaved"], mask_fill=a["mask_fill"])


def single_result(tmp_path: Path, name: str, outputs: dict) -> list[golden.Result]:
    write_outputs(tmp_path, name, outputs)
    return golden.verify_outputs([case(name)], tmp_path)


def test_perturbed_output_is_caught_with_its_worst_element(tmp_path):
    y = expected_outputs(case("op_linear_bias"))["output.y"].copy()
    y[1, 2, 3] += 1e-4 * np.abs(y).max()
    (r,) = single_result(tmp_path, "op_linear_bias", {"output.y": y})
    assert r.status == golden.NOT_OK and r.worst["index"] == [1, 2, 3]
    (r,) = single_result(tmp_path, "op_linear_bias", {"output.y": y.astype(np.float32)})
    assert r.status == golden.NOT_OK and r.dtype == "float32"


def test_transposed_output_is_caught(tmp_path):
    y = expected_outputs(case("op_attention_mha_bidirectional"))["output.y"]  # [B, H, T, D]
    heads_last = y.transpose(0, 2, 1, 3).reshape(y.shape)  # a head/time layout mix-up, same shape
    (r,) = single_result(tmp_path, "op_attention_mha_bidirectional", {"output.y": heads_last})
    assert r.status == golden.NOT_OK
    (r,) = single_result(tmp_path, "op_attention_mha_bidirectional", {"output.y": y.transpose(0, 2, 1, 3)})
    assert r.status == golden.SHAPE


@pytest.mark.parametrize("name", ["op_attention_gqa_block_causal", "op_attention_gqa_interleaved_causal"])
def test_wrong_gqa_order_is_caught(tmp_path, name):
    args = attention_inputs(case(name))
    assert single_result(tmp_path, name, {"output.y": ops.attention(**args)})[0].passed
    args["interleaved"] = not args["interleaved"]
    assert single_result(tmp_path, name, {"output.y": ops.attention(**args)})[0].status == golden.NOT_OK


def test_wrong_gqa_order_in_a_whole_model_is_caught(tmp_path):
    from refslm import models
    from refslm.config import EncoderDecoderConfig

    c = case("model_ed_gqa_block")
    t = golden.load_case(c)
    params = {n[len("param."):]: v for n, v in t.items() if n.startswith("param.")}
    config = EncoderDecoderConfig.from_dict({**c.config, "is_interleaved": not c.config["is_interleaved"]})
    logits = models.from_params(config, params, dtype="float64").logits(t["input.input_ids"],
                                                                        t["input.decoder_input_ids"])
    assert single_result(tmp_path, c.name, {"output.logits": logits})[0].status == golden.NOT_OK


@pytest.mark.parametrize("name", ["op_attention_mqa_padded", "op_attention_causal_padded_fully_masked"])
def test_missing_mask_is_caught(tmp_path, name):
    args = attention_inputs(case(name))
    args["key_mask"] = None
    assert single_result(tmp_path, name, {"output.y": ops.attention(**args)})[0].status == golden.NOT_OK


def test_missing_nonfinite_and_misshaped_outputs_are_reported(tmp_path):
    y = expected_outputs(case("op_rmsnorm_plain"))["output.y"].copy()
    results = golden.verify_outputs([case("op_rmsnorm_plain"), case("op_embedding")], tmp_path)
    assert statuses(results) == {golden.MISSING}  # no files at all
    (r,) = single_result(tmp_path, "op_rmsnorm_plain", {"output.other": y})
    assert r.status == golden.MISSING and "output.y" in r.message
    y[0, 0, 0] = np.nan
    (r,) = single_result(tmp_path, "op_rmsnorm_plain", {"output.y": y})
    assert r.status == golden.NONFINITE and r.worst["index"] == [0, 0, 0]
    (r,) = single_result(tmp_path, "op_rmsnorm_plain", {"output.y": y[:1]})
    assert r.status == golden.SHAPE
    (r,) = single_result(tmp_path, "op_rmsnorm_plain", {"output.y": y.astype(np.float16)})
    assert r.status == golden.DTYPE
    (r,) = single_result(tmp_path, "generate_ed_greedy", {"output.tokens": np.zeros((3, 6))})
    assert r.status == golden.DTYPE  # token ids must be integers


def test_verify_outputs_reads_safetensors(tmp_path):
    from refslm.safetensors_io import write_safetensors

    write_safetensors(tmp_path / "op_embedding.safetensors", expected_outputs(case("op_embedding")))
    assert main(["verify", "--outputs", str(tmp_path), "--case", "op_embedding"]) == 0



def test_float64_loss_values_beside_a_float32_gradient_take_the_float32_class(tmp_path):
    """SPEC: loss values are float64 whatever the compute dtype; a float32 run stores its gradient in float32,
    and the case is judged at float32 tolerances (at float64 ones the float32 run's values fail)."""
    c = case("loss_rows_reverse_kl")
    results = golden.verify_backends([c], ["numpy"], ["float32"])
    assert all(r.passed for r in results), golden.format_table(results)
    t = golden.load_case(c)
    from refslm import losses

    values, grad = losses.loss_rows(c.attributes["kind"], t["input.student"].astype(np.float32),
                                    t["input.teacher"].astype(np.float32), None, t["input.row_weight"],
                                    temperature=c.attributes["temperature"], beta=c.attributes["beta"],
                                    label_smoothing=c.attributes["label_smoothing"])
    assert values.dtype == np.float64 and grad.dtype == np.float32
    rows = single_result(tmp_path, c.name, {"output.values": values, "output.grad": grad})
    assert [(r.status, r.dtype) for r in rows] == [(golden.OK, "float32")] * 2, golden.format_table(rows)
    rows = golden.verify_outputs([c], tmp_path, "float64")
    assert rows[0].status == golden.NOT_OK


def test_npy_directories_big_endian_and_ambiguous_outputs(tmp_path):
    y = expected_outputs(case("op_rmsnorm_plain"))["output.y"]
    folder = tmp_path / "op_rmsnorm_plain"
    folder.mkdir()
    np.save(folder / "output.y.npy", y.astype(">f8"))  # the layout a C++ harness writes most easily
    assert [r.status for r in golden.verify_outputs([case("op_rmsnorm_plain")], tmp_path)] == [golden.OK]
    np.save(folder / "output.y.npy", y + 1)
    assert [r.status for r in golden.verify_outputs([case("op_rmsnorm_plain")], tmp_path)] == [golden.NOT_OK]
    write_outputs(tmp_path, "op_rmsnorm_plain", {"output.y": y})  # and an .npz beside it: which one counts?
    (r,) = golden.verify_outputs([case("op_rmsnorm_plain")], tmp_path)
    assert r.status == golden.ERROR and "has outputs in 2 places" in r.message


def test_unreadable_and_misnamed_outputs_say_what_is_wrong(tmp_path):
    (tmp_path / "op_rmsnorm_plain.npz").write_bytes(b"not a zip archive")
    (r,) = golden.verify_outputs([case("op_rmsnorm_plain")], tmp_path)
    assert r.status == golden.ERROR and "not an .npz archive" in r.message
    assert r.message.count("op_rmsnorm_plain.npz") == 1
    (r,) = single_result(tmp_path, "op_rmsnorm_plain", {"y": np.zeros(3), "output.why": np.zeros(3)})
    assert r.status == golden.MISSING and "the file holds ['output.why', 'y']" in r.message


def test_custom_tolerance_judges_a_half_precision_port(tmp_path, capsys):
    y = expected_outputs(case("op_rmsnorm_plain"))["output.y"]
    write_outputs(tmp_path, "op_rmsnorm_plain", {"output.y": y.astype(np.float16)})
    args = ["verify", "--outputs", str(tmp_path), "--case", "op_rmsnorm_plain"]
    assert main(args) == 1  # float16 is no compute dtype of the manifest
    assert "dtype float16, expected float32 or float64" in capsys.readouterr().out
    assert main([*args, "--rtol", "1e-3", "--atol", "1e-3"]) == 0  # half rounding: 2^-11 relative
    assert main([*args, "--rtol", "1e-5", "--atol", "1e-5"]) == 1
    capsys.readouterr()
    for bad in (["--rtol", "1e-3"], ["--rtol", "-1", "--atol", "0"], ["--backend", "numpy"]):
        assert main([*args, *bad]) == 2
    assert main(["verify", "--case", "op_rmsnorm_plain", "--rtol", "1", "--atol", "1"]) == 2
    assert "only with --outputs" in capsys.readouterr().err


def test_json_report_is_strict_json_when_outputs_are_not_finite(tmp_path, capsys):
    y = expected_outputs(case("op_rmsnorm_plain"))["output.y"].copy()
    y[0, 0, 0], y[0, 0, 1] = np.nan, np.inf
    write_outputs(tmp_path, "op_rmsnorm_plain", {"output.y": y})
    assert main(["verify", "--outputs", str(tmp_path), "--case", "op_rmsnorm_plain", "--json"]) == 1

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    report = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert report["results"][0]["worst"]["got"] == "nan"


def test_report_marks_exact_rows_and_names_no_backend_for_corrupt_cases():
    exact = golden.Result("c", "outputs", "float64", "output.tokens", golden.NOT_OK, max_abs_err=1.0, max_rel_err=1.0)
    assert "exact" in golden.format_table([exact]).splitlines()[1]
    corrupt = golden.Result("c", "-", "-", "*", golden.CORRUPT, message="modified")
    assert golden.summary_line([corrupt]) == ("NOT OK: 0/1 checks passed over 1 cases on no backend; 1 failed in 1 "
                                              "cases: c")

# ------------------------------------------------------------------ tampering, export, CLI


def test_tampered_golden_file_is_reported_as_corrupt(tmp_path, capsys):
    suite = tmp_path / "suite"
    shutil.copytree(golden_dir(), suite)
    path = suite / "cases" / "op_linear_bias.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of the last expected value
    path.write_bytes(bytes(data))
    assert main(["verify", "--golden", str(suite), "--backend", "numpy", "--case", "op_linear_*"]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and "SHA-256" in out and "NOT OK" in out
    rows = golden.verify_backends(golden.select(golden.load_manifest(suite), ["op_linear_bias"]), ["numpy"],
                                  golden.DTYPES)
    assert [r.status for r in rows] == [golden.CORRUPT]


@pytest.mark.parametrize("fmt", ["npz", "npy"])
def test_export_round_trip(tmp_path, fmt):
    names = ["op_rope_ntk", "loss_kd_public_code", "generate_ed_greedy"]
    args = ["golden", "export", "--format", fmt, str(tmp_path)] + [a for n in names for a in ("--case", n)]
    assert main(args) == 0
    exported = golden.load_manifest(tmp_path)
    assert [c.name for c in exported] == names
    for c in exported:
        assert golden.hash_problem(c) is None
        original = golden.load_case(case(c.name))
        copy = golden.load_case(c)
        assert set(copy) == set(original)
        for name, value in original.items():
            assert copy[name].dtype == value.dtype and np.array_equal(copy[name], value)
        assert c.dtypes == case(c.name).dtypes and c.shapes == case(c.name).shapes
    assert main(["verify", "--golden", str(tmp_path), "--backend", "numpy"]) == 0


def test_export_refuses_the_suite_itself_and_an_empty_selection(tmp_path, capsys):
    suite = tmp_path / "suite"
    shutil.copytree(golden_dir(), suite)
    before = (suite / "manifest.json").read_bytes()
    for target in (suite, suite / "."):  # exporting a selection there would replace the suite's manifest
        assert main(["golden", "export", "--format", "npz", "--golden", str(suite), "--case", "op_rmsnorm*",
                     str(target)]) == 2
        assert "is the suite being exported" in capsys.readouterr().err
    assert main(["golden", "export", "--format", "npz", "--case", "op_rmsnorm*", str(suite)]) == 2
    assert "is not an export's manifest" in capsys.readouterr().err  # a copy of a suite, not an export
    assert (suite / "manifest.json").read_bytes() == before
    assert main(["golden", "export", "--format", "npz", "--case", "zzz*", str(tmp_path / "e")]) == 2
    assert "no golden case matches ['zzz*']" in capsys.readouterr().err
    for fmt in ("npz", "npy"):  # an earlier export is overwritten
        assert main(["golden", "export", "--format", fmt, "--case", "op_rmsnorm*", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["exported_as"] == "npy"


def test_cli_json_and_exit_status(capsys):
    assert main(["verify", "--backend", "numpy", "--case", "op_linear_*bias", "--dtype", "float32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["ok"] and report["summary"]["checks"] == 2
    assert {r["dtype"] for r in report["results"]} == {"float32"}
    assert main(["verify", "--case", "no_such_case"]) == 2
    assert "no golden case matches ['no_such_case']" in capsys.readouterr().err


def test_verifier_imports_no_torch():
    code = ("import sys; from refslm.cli import main; "
            "assert main(['verify', '--backend', 'numpy', '--case', 'op_gated_*']) == 0; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)


# ------------------------------------------------------------------ README worked example


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_readme_worked_example_end_to_end(tmp_path, dtype):
    exported, outputs = tmp_path / "golden-npz", tmp_path / "my-outputs"
    assert main(["golden", "export", "--format", "npz", str(exported)]) == 0
    subprocess.run([sys.executable, str(REPO / "golden" / "examples" / "numpy_port.py"), str(exported), str(outputs),
                    "--dtype", dtype], check=True, capture_output=True)
    selection = ["--case", "op_rmsnorm_*", "--case", "op_attention_*", "--case", "op_gated_silu"]
    assert main(["verify", "--outputs", str(outputs), *selection]) == 0
    assert main(["verify", "--outputs", str(outputs), "--case", "op_linear_bias"]) == 1  # not implemented: missing


def test_regenerating_gives_identical_files(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    subprocess.run([sys.executable, str(REPO / "golden" / "generate.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    assert (tmp_path / "manifest.json").read_bytes() == (golden_dir() / "manifest.json").read_bytes()
    for c in CASES:
        assert (tmp_path / "cases" / c.path.name).read_bytes() == c.path.read_bytes(), c.name


@pytest.mark.parametrize("manifest,message", [
    (b"[1]", "expected an object with format_version 1"),
    (b'{"format_version": 1, "cases": [3]}', "every entry of 'cases' must be an object, got 3"),
    (b"\xff\xfe", "manifest.json: not valid JSON"),
])
def test_cli_bad_manifest_is_exit_2_with_the_reason(tmp_path, capsys, manifest, message):
    (tmp_path / "manifest.json").write_bytes(manifest)
    assert main(["verify", "--golden", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_unusable_backend_and_unwritable_export_are_exit_2(tmp_path, capsys, monkeypatch):
    def unavailable(cases, names, dtypes):
        raise golden.BackendUnavailable("no OpenCL device matches '9:9'")

    monkeypatch.setattr(golden, "verify_backends", unavailable)
    assert main(["verify", "--case", "op_linear_*"]) == 2
    assert "refslm verify: error: no OpenCL device matches '9:9'" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["golden", "export", "--format", "npz", "--case", "op_linear_*", str(tmp_path / "file" / "x")]) == 2
    assert "refslm golden export: error:" in capsys.readouterr().err


def test_manifest_that_is_a_directory_is_exit_2(tmp_path, capsys):
    (tmp_path / "manifest.json").mkdir()
    assert main(["verify", "--golden", str(tmp_path)]) == 2
    assert "manifest.json: expected a regular file, found a directory" in capsys.readouterr().err
