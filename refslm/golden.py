"""The golden suite: manifest and case loading, running cases on backends, comparison, reports.

Golden cases are written by golden/generate.py (PyTorch / transformers in float64, never refslm).
Each case is one safetensors file of `input.*`, `param.*` and `output.*` tensors; golden/manifest.json
lists every case with its kind, config, attributes, tensor names, tolerances and SHA-256. SPEC.md
section 8 is the normative description of the format and of the pass rule

    |got - expected| <= atol + rtol * |expected|   for every element (infinities must match exactly).

Commands (refslm/cli.py dispatches here):
  refslm verify [--backend B] [--case GLOB] [--dtype D] [--json]   run the cases on refslm's backends
  refslm verify --outputs DIR [--case GLOB] [--rtol R --atol A]   check another implementation's outputs
  refslm golden export --format npz|npy DIR                       copy the suite for non-safetensors readers
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import ops
from .backends import BackendUnavailable
from .resources import golden_dir
from .safetensors_io import read_json_file, read_safetensors

DTYPES = ("float32", "float64")
OK, NOT_OK = "OK", "NOT OK"
# Statuses of a result row: OK passes; every other status fails the run.
CORRUPT, MISSING, SHAPE, DTYPE, NONFINITE, ERROR = "CORRUPT", "MISSING", "SHAPE", "DTYPE", "NONFINITE", "ERROR"


class GoldenError(RuntimeError):
    """The golden suite or a user's output directory is unreadable or malformed."""


# ------------------------------------------------------------------ manifest and case files


@dataclass(frozen=True)
class GoldenCase:
    """One manifest entry (see SPEC.md section 8 for every field)."""

    name: str
    kind: str
    description: str
    path: Path
    config: dict | None
    attributes: dict
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shapes: dict
    tolerances: dict
    dtypes: dict  # tensor name -> "int64" | "float64" (the stored dtype)
    sha256: Any  # str for a file, {tensor name: str} for an npy export directory

    def tolerance(self, output: str, dtype: str) -> tuple[float, float] | None:
        """(rtol, atol) of an output for a compute dtype; None for exact (integer) outputs."""
        entry = self.tolerances[output]
        if entry.get("exact"):
            return None
        return float(entry[dtype]["rtol"]), float(entry[dtype]["atol"])

    def entry(self, file: str, sha256: Any) -> dict[str, Any]:
        """The manifest entry of this case, pointing at `file` (relative to the manifest) with `sha256`."""
        return {"name": self.name, "kind": self.kind, "description": self.description, "file": file,
                "config": self.config, "attributes": self.attributes, "inputs": list(self.inputs),
                "outputs": list(self.outputs), "shapes": self.shapes, "dtypes": self.dtypes,
                "tolerances": self.tolerances, "sha256": sha256}


def load_manifest(directory: str | Path | None = None) -> list[GoldenCase]:
    """Read manifest.json of a golden directory (default: the packaged suite) -> cases in file order."""
    root = Path(directory) if directory is not None else golden_dir()
    path = root / "manifest.json"
    try:
        data = read_json_file(path, GoldenError)  # a regular UTF-8 JSON file (never blocks on a FIFO)
    except FileNotFoundError:
        raise GoldenError(f"no golden manifest at {path}") from None
    if not isinstance(data, dict) or data.get("format_version") != 1 or not isinstance(data.get("cases"), list):
        raise GoldenError(f"{path}: expected an object with format_version 1 and a 'cases' list")
    cases = []
    for entry in data["cases"]:
        if not isinstance(entry, dict):
            raise GoldenError(f"{path}: every entry of 'cases' must be an object, got {entry!r}")
        try:
            cases.append(GoldenCase(
                name=entry["name"], kind=entry["kind"], description=entry["description"], path=root / entry["file"],
                config=entry.get("config"), attributes=entry.get("attributes", {}),
                inputs=tuple(entry["inputs"]), outputs=tuple(entry["outputs"]), shapes=entry.get("shapes", {}),
                dtypes=entry.get("dtypes", {}), tolerances=entry["tolerances"], sha256=entry["sha256"]))
        except KeyError as exc:
            raise GoldenError(f"{path}: case {entry.get('name', '?')!r} lacks field {exc}") from None
    return cases


def select(cases: Iterable[GoldenCase], patterns: list[str] | None) -> list[GoldenCase]:
    """Cases whose name matches any glob pattern (all cases when patterns is empty)."""
    cases = list(cases)
    if not patterns:
        return cases
    return [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_problem(case: GoldenCase) -> str | None:
    """None when the case's file(s) match the manifest's SHA-256, else a message saying what differs."""
    expected = case.sha256 if isinstance(case.sha256, dict) else {None: case.sha256}
    for tensor, digest in expected.items():
        path = case.path if tensor is None else case.path / f"{tensor}.npy"
        if not path.is_file():
            return f"golden file {path} is missing"
        actual = file_sha256(path)
        if actual != digest:
            return f"golden file {path} was modified: SHA-256 {actual[:16]}... != manifest {digest[:16]}..."
    return None


def read_tensor_file(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file, an .npz archive or a directory of .npy files (no pickle); an
    unreadable file raises an error that names it."""
    if not path.is_dir() and path.suffix != ".npz":
        return read_safetensors(path)
    try:
        if path.is_dir():
            return {p.name[:-4]: np.load(p, allow_pickle=False) for p in sorted(path.glob("*.npy"))}
        if not zipfile.is_zipfile(path):
            raise ValueError("not an .npz archive (a zip file of .npy members, as numpy.savez writes)")
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise GoldenError(f"{path}: {exc}") from exc


def load_case(case: GoldenCase) -> dict[str, np.ndarray]:
    """All tensors of a case (call hash_problem first: this does not check the hash)."""
    tensors = read_tensor_file(case.path)
    missing = [n for n in case.inputs + case.outputs if n not in tensors]
    if missing:
        raise GoldenError(f"case {case.name}: file {case.path} lacks tensors {missing}")
    return tensors


# ------------------------------------------------------------------ comparison


@dataclass
class Result:
    """One row of the report: one output of one case on one backend and dtype."""

    case: str
    backend: str
    dtype: str
    output: str
    status: str
    max_abs_err: float | None = None
    max_rel_err: float | None = None  # max|got - expected| / max|expected| over finite entries
    rtol: float | None = None
    atol: float | None = None
    worst: dict | None = None  # failing tensors: {"index", "expected", "got"} of the worst element
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.status == OK


def compare(expected: np.ndarray, got: np.ndarray, tolerance: tuple[float, float] | None) -> dict[str, Any]:
    """Compare one tensor -> fields of a Result (status, errors, worst element); shapes must already match.

    tolerance None means exact equality (integer outputs). Non-finite expected entries (-inf
    log-probabilities) must be reproduced exactly; NaN or an infinity elsewhere is NONFINITE.
    """
    exp = expected.astype(np.float64)
    act = got.astype(np.float64)
    finite = np.isfinite(exp)
    bad = np.isnan(act) | (np.isinf(act) & finite) | (~finite & (act != exp))
    scale = float(np.max(np.abs(exp[finite]))) if finite.any() else 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(finite & ~bad, np.abs(act - exp), 0.0)
    max_abs = float(diff.max()) if diff.size else 0.0
    fields: dict[str, Any] = {"max_abs_err": max_abs, "max_rel_err": max_abs / scale if scale else max_abs}
    if tolerance is not None:
        fields["rtol"], fields["atol"] = tolerance
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        fields.update(status=NONFINITE, message=f"{int(bad.sum())} non-finite or wrong infinite entries")
    else:
        rtol, atol = tolerance if tolerance is not None else (0.0, 0.0)
        excess = diff - (atol + rtol * np.where(finite, np.abs(exp), 0.0))
        if diff.size == 0 or excess.max() <= 0:
            fields["status"] = OK
            return fields
        index = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), excess.shape))
        fields.update(status=NOT_OK, message=f"{int((excess > 0).sum())} of {excess.size} elements out of tolerance")
    fields["worst"] = {"index": list(index), "expected": float(exp[index]), "got": float(act[index])}
    return fields


def tolerance_class(case: GoldenCase, got: dict[str, np.ndarray]) -> str:
    """The compute dtype whose tolerances judge another implementation's outputs of a case: float32 when
    any of its float outputs is stored in float32 (or narrower), else float64. Values that SPEC defines
    as float64 whatever the compute dtype (loss values beside a float32 gradient) are judged with the
    rest of their case."""
    floats = [v for n, v in got.items() if n in case.outputs and isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    return "float32" if any(v.dtype.itemsize < 8 for v in floats) else "float64"


def check_outputs(case: GoldenCase, tensors: dict[str, np.ndarray], got: dict[str, np.ndarray], backend: str,
                  dtype: str, custom: tuple[float, float] | None = None) -> list[Result]:
    """Compare every manifest output of a case with `got` at the tolerances of compute dtype `dtype`, or at
    `custom` (rtol, atol) for every float output, which then may be float16 too (a half-precision port)."""
    results = []
    allowed = (np.float16, np.float32, np.float64) if custom else (np.float32, np.float64)
    for name in case.outputs:
        expected = tensors[name]
        row = Result(case.name, backend, dtype, name, MISSING)
        value = got.get(name)
        if isinstance(value, np.ndarray) and value.dtype.byteorder not in "=|":
            value = value.astype(value.dtype.newbyteorder("="))  # big-endian files hold the same numbers
        if value is None:
            row.message = f"output {name} not produced; the file holds {sorted(got)}"
        elif not isinstance(value, np.ndarray) or value.shape != expected.shape:
            shape = getattr(value, "shape", type(value).__name__)
            row.status, row.message = SHAPE, f"shape {shape}, expected {expected.shape}"
        elif (expected.dtype.kind in "iu") != (value.dtype.kind in "iub") or value.dtype.kind not in "iubf" or (
                value.dtype.kind == "f" and value.dtype not in allowed):
            kind = "integer" if expected.dtype.kind in "iu" else " or ".join(np.dtype(a).name for a in allowed)
            row.status, row.message = DTYPE, f"dtype {value.dtype}, expected {kind}"
        else:
            tolerance = case.tolerance(name, dtype)
            for key, val in compare(expected, value, custom if custom and tolerance else tolerance).items():
                setattr(row, key, val)
        results.append(row)
    return results


# ------------------------------------------------------------------ running cases on refslm backends


def _run_op(case: GoldenCase, t: dict[str, np.ndarray], backend, dtype: str) -> dict[str, np.ndarray]:
    """Run an 'op' case through the backend's kernel for that op (log_softmax: refslm.ops on the host)."""
    a = case.attributes
    op = a["op"]
    on = backend.asarray
    if op in HOST_OPS:
        return {"output.y": getattr(ops, op)(t["input.x"], axis=a["axis"])}
    if op == "softmax":
        if a["axis"] != -1:
            raise GoldenError(f"case {case.name}: backends compute softmax over the last axis only")
        y = backend.softmax(on(t["input.x"]))
    elif op == "rmsnorm":
        y = backend.rmsnorm(on(t["input.x"]), on(t["input.weight"]), a["eps"], a["unit_offset"])
    elif op == "activation":
        y = backend.activation(on(t["input.x"]), a["kind"])
    elif op == "gated":
        y = backend.gated(on(t["input.gate"]), on(t["input.up"]), a["kind"])
    elif op == "linear":
        bias, residual = t.get("input.bias"), t.get("input.residual")
        y = backend.linear(on(t["input.x"]), on(t["input.weight"]), None if bias is None else on(bias),
                           None if residual is None else on(residual), a.get("activation"))
    elif op == "embedding":
        y = backend.embedding(t["input.ids"], on(t["input.table"]))
    elif op == "rope":
        x = t["input.x"]
        theta = a["theta"]
        if "ntk_factor" in a:  # dynamic NTK cases
            theta = ops.rope_theta_for_length(theta, x.shape[-1], a["seq_len"], a["ntk_factor"], a["block_size"])
        cos, sin = ops.rope_cos_sin(t["input.positions"], x.shape[-1], theta, a["layout"], a["linear_factor"],
                                    a.get("ext_factors"), a.get("attention_factor", 1.0))
        y = backend.rope(on(x), cos, sin, a["layout"])
        return {"output.y": backend.to_numpy(y), "output.cos": cos, "output.sin": sin}
    elif op == "attention":
        mask = t.get("input.key_mask")
        y = backend.attention(on(t["input.q"]), on(t["input.k"]), on(t["input.v"]),
                              key_mask=None if mask is None else mask.astype(bool), causal=a["causal"],
                              q_start=a["q_start"], interleaved=a["interleaved"], mask_fill=a["mask_fill"],
                              segment_ids=t.get("input.segment_ids"))
    else:
        raise GoldenError(f"case {case.name}: unknown op {op!r}")
    return {"output.y": backend.to_numpy(y)}


HOST_OPS = ("log_softmax",)


def case_model(case: GoldenCase, t: dict[str, np.ndarray], backend, dtype: str):
    """The refslm model of a model/generate case: config from the manifest, weights from param.* tensors."""
    from . import models
    from .config import DecoderOnlyConfig, EncoderDecoderConfig

    kind = case.attributes["model_kind"]
    cls = EncoderDecoderConfig if kind == "encoder_decoder" else DecoderOnlyConfig
    config = cls.from_dict(case.config, ignore_unknown=False)
    params = {name[len("param."):]: value for name, value in t.items() if name.startswith("param.")}
    return models.from_params(config, params, dtype=dtype, backend=backend)


def _run_model(case: GoldenCase, t: dict[str, np.ndarray], backend, dtype: str) -> dict[str, np.ndarray]:
    """Logits of a whole model, no cache: encoder-decoder (input_ids, decoder_input_ids) or decoder-only
    (input_ids, optional position_ids and segment_ids). Packed rows (segment_ids): the golden holds the
    logits of the tokens with segment > 0 only, [N, V] in row-major order."""
    model = case_model(case, t, backend, dtype)
    segments = t.get("input.segment_ids")
    logits = model.logits(t["input.input_ids"], t.get("input.decoder_input_ids"),
                          position_ids=t.get("input.position_ids"), segment_ids=segments)
    return {"output.logits": logits if segments is None else logits[segments > 0]}


@dataclass(frozen=True)
class Runner:
    """How refslm runs one kind of case: run(case, tensors in the compute dtype, backend, dtype) -> outputs."""

    run: Callable[[GoldenCase, dict[str, np.ndarray], Any, str], dict[str, np.ndarray]]
    uses_backend: Callable[[GoldenCase], bool] = field(default=lambda case: True)


def _run_generate(case: GoldenCase, t: dict[str, np.ndarray], backend, dtype: str) -> dict[str, np.ndarray]:
    """KV-cached decoding (refslm.generate.CachedDecoder) or greedy generation (model.generate)."""
    from .generate import CachedDecoder

    a = case.attributes
    model = case_model(case, t, backend, dtype)
    if a["mode"] == "greedy":
        return {"output.tokens": model.generate(t["input.input_ids"], a["max_new_tokens"], greedy=True,
                                                eos_token_id=model.config.eos_token_id)}
    if "input.decoder_input_ids" in t:  # encoder-decoder: prefill the first tokens, then one token per step
        ids = t["input.decoder_input_ids"]
        prefill, following = ids[:, :a["prefill"]], ids[:, a["prefill"]:]
        decoder = CachedDecoder(model, t["input.input_ids"], following.shape[1], prefill)
    else:  # decoder-only: the prompt is the prefill
        following = t["input.continuation_ids"]
        decoder = CachedDecoder(model, t["input.input_ids"], following.shape[1])
    logits = [decoder.logits] + [decoder.step(following[:, i]) for i in range(following.shape[1])]
    return {"output.logits": np.stack(logits, axis=1)}


def _run_loss(case: GoldenCase, t: dict[str, np.ndarray], backend, dtype: str) -> dict[str, np.ndarray]:
    """A public loss of refslm.losses (direct form on the backend's kernel, streaming or fused form)."""
    from . import losses

    a = case.attributes
    options = dict(a["options"])
    if "input.mask" in t:
        options["mask"] = t["input.mask"].astype(bool)
    if "input.labels" in t:
        options["labels"] = t["input.labels"]
    positional = [t[name] for name in a["positional"]]
    form = a.get("form", "direct")
    if form == "fused":
        value, grad_hidden, grad_lm_head = losses.fused_linear_loss(
            t["input.hidden"], t["input.lm_head"], *positional, loss=a["function"], chunk_rows=a["chunk_rows"],
            backend=backend, **options)
        return {"output.value": np.asarray(value), "output.grad_hidden": grad_hidden,
                "output.grad_lm_head": grad_lm_head}
    if form == "streaming":
        options["chunk_size"] = tuple(a["chunk_size"])
    value, grad = losses.LOSSES[a["function"]](t["input.student"], *positional, backend=backend, **options)
    return {"output.value": np.asarray(value), "output.grad": grad}


def _run_loss_rows(case: GoldenCase, t: dict[str, np.ndarray], backend, dtype: str) -> dict[str, np.ndarray]:
    """The backend kernel Backend.loss_rows on host arrays moved to the backend."""
    a = case.attributes
    teacher = t.get("input.teacher")
    values, grad = backend.loss_rows(a["kind"], backend.asarray(t["input.student"]),
                                     None if teacher is None else backend.asarray(teacher), t.get("input.targets"),
                                     t["input.row_weight"], temperature=a["temperature"], beta=a["beta"],
                                     label_smoothing=a["label_smoothing"])
    return {"output.values": np.asarray(values), "output.grad": backend.to_numpy(grad)}


def _split(ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Concatenated ids and row lengths -> the rows."""
    return np.split(ids, np.cumsum(lengths)[:-1])


def _run_align(case: GoldenCase, t: dict[str, np.ndarray], backend, dtype: str) -> dict[str, np.ndarray]:
    """The paper's KD alignment (refslm.align) or cross-tokenizer alignment (refslm.token_align.align_offsets)."""
    a = case.attributes
    if a["mode"] == "cross_tokenizer":
        from .token_align import align_offsets

        text = "".join(chr(c) for c in t["input.text_codepoints"])
        surfaces = {side: [bytes(row.astype(np.uint8)) for row in _split(t[f"input.{side}_surface_bytes"],
                                                                           t[f"input.{side}_surface_lengths"])]
                    for side in ("student", "teacher")}
        result = align_offsets(text, t["input.student_offsets"], t["input.teacher_offsets"], surfaces["student"],
                               surfaces["teacher"])
        return {"output.teacher_index": result.teacher_index,
                "output.kind": np.array([a["kind_codes"][k] for k in result.kind], dtype=np.int64),
                "output.blocks": np.array(result.blocks, dtype=np.int64).reshape(-1, 4)}
    from . import align

    layout = align.PaperLayout(a["encoder_len"], a["decoder_len"], pad_id=a["pad_id"], bos_id=a["bos_id"])
    sources = _split(t["input.source_ids"], t["input.source_lengths"])
    targets = _split(t["input.target_ids"], t["input.target_lengths"])
    student = align.student_batch(sources, targets, layout)
    teacher = align.paper_teacher_batch(sources, targets, layout)
    index_map, valid = align.index_map(teacher, a["decoder_len"])
    return {"output.encoder_input_ids": student.encoder_input_ids,
            "output.decoder_input_ids": student.decoder_input_ids, "output.labels": student.labels,
            "output.teacher_input_ids": teacher.input_ids,
            "output.teacher_attention_mask": teacher.attention_mask, "output.index_map": index_map,
            "output.valid": valid, "output.gathered_teacher_logits":
            align.gather_teacher_logits(t["input.teacher_logits"], index_map, valid)}


RUNNERS: dict[str, Runner] = {
    "op": Runner(_run_op, lambda case: case.attributes["op"] not in HOST_OPS),
    "model": Runner(_run_model),
    "loss": Runner(_run_loss, lambda case: case.attributes.get("form") != "streaming"),
    "loss_rows": Runner(_run_loss_rows),
    "generate": Runner(_run_generate),
    "align": Runner(_run_align, lambda case: False),
}


def run_case(case: GoldenCase, tensors: dict[str, np.ndarray], backend, dtype: str) -> dict[str, np.ndarray]:
    """refslm's outputs for a case on a backend instance, in the compute dtype."""
    if case.kind not in RUNNERS:
        raise GoldenError(f"case {case.name}: no runner for kind {case.kind!r}")
    keep = case.attributes.get("float64_inputs", ())
    inputs = {n: (tensors[n] if n in keep else tensors[n].astype(dtype) if tensors[n].dtype.kind == "f"
                  else tensors[n]) for n in case.inputs}
    return RUNNERS[case.kind].run(case, inputs, backend, dtype)


def verify_backends(cases: list[GoldenCase], backend_names: list[str], dtypes: Iterable[str]) -> list[Result]:
    """Run every case on every backend and dtype it supports; host-only cases run once, on 'numpy'."""
    from .backends import get_backend

    backends = [get_backend(name) for name in backend_names]
    results: list[Result] = []
    for case in cases:
        problem = hash_problem(case)
        if problem is not None:
            results.append(Result(case.name, "-", "-", "*", CORRUPT, message=problem))
            continue
        tensors = load_case(case)
        runner = RUNNERS.get(case.kind)
        for backend in backends:
            if runner is not None and not runner.uses_backend(case) and backend.name != "numpy":
                continue
            for dtype in dtypes:
                if dtype not in backend.dtypes:
                    continue
                try:
                    got = run_case(case, tensors, backend, dtype)
                except Exception as exc:  # reported per case; the run goes on
                    results.append(Result(case.name, backend.name, dtype, "*", ERROR,
                                          message=f"{type(exc).__name__}: {exc}"))
                    continue
                results.extend(check_outputs(case, tensors, got, backend.name, dtype))
    return results


OUTPUT_LAYOUTS = ("{case}.safetensors", "{case}.npz", "{case}/")  # under --outputs DIR; "/": .npy files


def find_output_file(directory: Path, case: str) -> Path | None:
    """The one file (or .npy directory) of a case's outputs; None when there is none; GoldenError for two."""
    found = [directory / layout.format(case=case) for layout in OUTPUT_LAYOUTS]
    found = [path for path, layout in zip(found, OUTPUT_LAYOUTS, strict=True)
             if (path.is_dir() if layout.endswith("/") else path.is_file())]
    if len(found) > 1:
        raise GoldenError(f"case {case} has outputs in {len(found)} places: {[str(p) for p in found]}; keep one")
    return found[0] if found else None


def verify_outputs(cases: list[GoldenCase], directory: str | Path, dtype: str | None = None,
                   custom: tuple[float, float] | None = None) -> list[Result]:
    """Check another implementation's outputs: DIR/<case>.safetensors, DIR/<case>.npz or DIR/<case>/<name>.npy.

    dtype: the tolerance class (compute dtype) to apply; None: tolerance_class per case. custom:
    (rtol, atol) for every float output instead of the manifest's (float16 outputs then allowed).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise GoldenError(f"--outputs {directory} is not a directory")
    results = []
    for case in cases:
        problem = hash_problem(case)
        if problem is not None:
            results.append(Result(case.name, "outputs", "-", "*", CORRUPT, message=problem))
            continue
        try:
            path = find_output_file(directory, case.name)
            got = None if path is None else read_tensor_file(path)
        except Exception as exc:  # an unreadable or ambiguous user file is a finding, not a crash
            results.append(Result(case.name, "outputs", "-", "*", ERROR, message=str(exc)))
            continue
        if got is None:
            places = ", ".join(layout.format(case=case.name) for layout in OUTPUT_LAYOUTS)
            results.append(Result(case.name, "outputs", "-", "*", MISSING, message=f"none of {places} in {directory}"))
            continue
        results.extend(check_outputs(case, load_case(case), got, "outputs", dtype or tolerance_class(case, got),
                                     custom))
    return results


# ------------------------------------------------------------------ reports


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def format_table(results: list[Result]) -> str:
    """Plain-text table, one line per result; failing rows are followed by their message and worst element."""
    header = ("case", "backend", "dtype", "output", "max abs err", "max rel err", "rtol / atol", "status")
    rows = [header]
    notes: dict[int, str] = {}
    for r in results:
        compared = r.max_abs_err is not None
        tol = "exact" if compared and r.rtol is None else f"{_fmt(r.rtol)} / {_fmt(r.atol)}"
        rows.append((r.case, r.backend, r.dtype, r.output, _fmt(r.max_abs_err), _fmt(r.max_rel_err), tol, r.status))
        if not r.passed:
            note = r.message
            if r.worst:
                w = r.worst
                note += f"; worst element {tuple(w['index'])}: expected {w['expected']!r}, got {w['got']!r}"
            notes[len(rows) - 1] = " ".join(note.split())[:400]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if i in notes:
            lines.append(f"    -> {notes[i]}")
    return "\n".join(lines)


def summary(results: list[Result]) -> dict[str, Any]:
    failed = [r for r in results if not r.passed]
    return {"checks": len(results), "passed": len(results) - len(failed), "failed": len(failed),
            "failed_cases": sorted({r.case for r in failed}), "ok": not failed and bool(results)}


def summary_line(results: list[Result]) -> str:
    s = summary(results)
    cases = len({r.case for r in results})
    backends = sorted({r.backend for r in results} - {"-"})  # "-": a corrupt case, run on no backend
    verdict = "ALL OK" if s["ok"] else ("NOTHING CHECKED" if not results else "NOT OK")
    line = (f"{verdict}: {s['passed']}/{s['checks']} checks passed over {cases} cases on "
            f"{', '.join(backends) or 'no backend'}")
    if s["failed"]:
        line += f"; {s['failed']} failed in {len(s['failed_cases'])} cases: {', '.join(s['failed_cases'][:10])}"
        line += " ..." if len(s["failed_cases"]) > 10 else ""
    return line


# ------------------------------------------------------------------ export


def export(cases: list[GoldenCase], directory: str | Path, fmt: str) -> Path:
    """Write the cases as .npz archives (fmt 'npz') or directories of .npy files ('npy'), with a manifest.

    The exported manifest has the same entries, with "file" and "sha256" describing the exported
    files, so `refslm verify --golden DIR` reads an export like the original suite.
    """
    if fmt not in ("npz", "npy"):
        raise ValueError(f"export format must be 'npz' or 'npy', got {fmt!r}")
    if not cases:
        raise GoldenError("no case to export")
    root = Path(directory)
    sources = {c.path.parent.parent.resolve() for c in cases}  # the suite directory: <suite>/cases/<file>
    if root.resolve() in sources:
        raise GoldenError(f"{root} is the suite being exported; export to another directory")
    previous = root / "manifest.json"
    if previous.is_file():
        try:
            data = read_json_file(previous, GoldenError)
        except GoldenError:
            data = None
        if not isinstance(data, dict) or "exported_as" not in data:
            raise GoldenError(f"{previous} exists and is not an export's manifest; export to another directory")
    (root / "cases").mkdir(parents=True, exist_ok=True)
    exported = []
    for case in cases:
        problem = hash_problem(case)
        if problem is not None:
            raise GoldenError(problem)
        tensors = load_case(case)
        if fmt == "npz":
            path = root / "cases" / f"{case.name}.npz"
            np.savez(path, **tensors)
            exported.append(case.entry(f"cases/{path.name}", file_sha256(path)))
        else:
            folder = root / "cases" / case.name
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir()
            hashes = {}
            for name, value in tensors.items():
                np.save(folder / f"{name}.npy", value, allow_pickle=False)
                hashes[name] = file_sha256(folder / f"{name}.npy")
            exported.append(case.entry(f"cases/{case.name}", hashes))
    manifest = {"format_version": 1, "exported_as": fmt, "cases": exported}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return root


# ------------------------------------------------------------------ command line


def verify_arguments(parser) -> None:
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="backend to run (repeatable; default: every installed backend)")
    parser.add_argument("--case", action="append", metavar="GLOB", help="only cases matching the glob (repeatable)")
    parser.add_argument("--dtype", choices=DTYPES, help="only this compute dtype (default: both); with --outputs, "
                        "the tolerance class to apply (default: float32 for a case with any float32 output, "
                        "else float64)")
    parser.add_argument("--outputs", metavar="DIR", help="check another implementation's outputs: "
                        "DIR/<case>.safetensors, DIR/<case>.npz or DIR/<case>/<output name>.npy")
    parser.add_argument("--rtol", type=float, metavar="R", help="with --outputs and --atol: one tolerance for every "
                        "float output instead of the manifest's (float16 outputs are then accepted)")
    parser.add_argument("--atol", type=float, metavar="A", help="with --outputs and --rtol (see --rtol)")
    parser.add_argument("--golden", metavar="DIR", help="golden suite directory (default: the packaged suite)")
    parser.add_argument("--json", action="store_true", help="print results and summary as JSON")


def verify_command(args) -> int:
    try:
        custom = custom_tolerance(args)
        cases = select(load_manifest(args.golden), args.case)
        if not cases:
            raise GoldenError(f"no golden case matches {args.case}")
        if args.outputs:
            if args.backend:
                raise GoldenError("--backend runs refslm's backends; with --outputs there is nothing to run")
            results = verify_outputs(cases, args.outputs, args.dtype, custom)
        else:
            from .backends import available_backends, backend_names

            names = args.backend or available_backends()
            unknown = [n for n in names if n not in backend_names()]
            if unknown:
                raise GoldenError(f"--backend must be among {list(backend_names())}, got {unknown}")
            results = verify_backends(cases, names, [args.dtype] if args.dtype else DTYPES)
    except (GoldenError, BackendUnavailable) as exc:  # BackendUnavailable: e.g. no such OpenCL device
        print(f"refslm verify: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"results": [_json_row(r) for r in results], "summary": summary(results)}, indent=1))
    else:
        print(format_table(results))
        print(summary_line(results))
    return 0 if summary(results)["ok"] else 1


def custom_tolerance(args) -> tuple[float, float] | None:
    """verify's --rtol / --atol -> (rtol, atol), or None when neither is given."""
    if args.rtol is None and args.atol is None:
        return None
    if args.rtol is None or args.atol is None or not args.outputs:
        raise GoldenError("--rtol and --atol go together, and only with --outputs")
    if not (0 <= args.rtol < math.inf and 0 <= args.atol < math.inf):
        raise GoldenError(f"--rtol and --atol must be finite numbers >= 0, got {args.rtol}, {args.atol}")
    return args.rtol, args.atol


def _json_safe(value: Any) -> Any:
    """Non-finite floats -> 'nan', 'inf', '-inf' (JSON has no such numbers), inside dicts and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _json_row(result: Result) -> dict[str, Any]:
    return _json_safe(asdict(result))


def golden_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="golden_action", metavar="ACTION", required=True)
    p = sub.add_parser("export", help="write the suite as .npz archives or .npy files with a manifest")
    p.add_argument("directory", metavar="DIR", help="where to write DIR/manifest.json and DIR/cases/ (not the "
                   "suite itself; an earlier export there is overwritten)")
    p.add_argument("--format", choices=("npz", "npy"), required=True,
                   help="npz: DIR/cases/<case>.npz; npy: DIR/cases/<case>/<tensor>.npy")
    p.add_argument("--case", action="append", metavar="GLOB", help="only cases matching the glob (repeatable)")
    p.add_argument("--golden", metavar="DIR", help="golden suite directory (default: the packaged suite)")


def golden_command(args) -> int:
    try:
        cases = select(load_manifest(args.golden), args.case)
        if not cases:
            raise GoldenError(f"no golden case matches {args.case}")
        root = export(cases, args.directory, args.format)
    except (GoldenError, OSError) as exc:  # OSError: DIR cannot be created or written
        print(f"refslm golden export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {len(cases)} cases as {args.format} to {root}")
    return 0


__all__ = ["GoldenCase", "GoldenError", "Result", "check_outputs", "compare", "export", "format_table",
           "load_case", "load_manifest", "run_case", "select", "verify_backends", "verify_outputs"]
