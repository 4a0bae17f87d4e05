"""Malformed, edited and hostile compress checkpoints: each is refused in one line naming the file and the
field, through the API and the CLI (exit 2), before anything is allocated or called; good checkpoints
(pruned, quantized) round-trip exactly and identical content saves to identical bytes.

The malformed files are generated here from a real ``compress.save`` of ``digits_mlp(hidden=8)``:
``Sequential(Flatten "0", Linear "1" 64->8, ReLU "2", Linear "3" 8->10)``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_errors import one_line_error

import compress
from compress.checkpoint import weights_digest
from compress.errors import CheckpointError
from compress.models import build, load_model

MLP = "compress.zoo:digits_mlp"
ABSURD = 4 * 10**14  # the plan: 4e14 x 64 float32 would be ~10^17 bytes


def _prune(modules: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"kind": "prune_channels", "payload": {"modules": modules}}]


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(ckpt: dict[str, Any]) -> None:
        ckpt[key] = value

    return mutate


def _state(fn: Callable[[dict[str, Any]], None], rehash: bool = False) -> Callable[[dict[str, Any]], None]:
    """Change the state_dict; with ``rehash`` the file's sha256 is recomputed, so only the change itself is wrong."""

    def mutate(ckpt: dict[str, Any]) -> None:
        fn(ckpt["state_dict"])
        if rehash:
            ckpt["weights_sha256"] = weights_digest(ckpt["state_dict"])

    return mutate


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _nan_weight(sd: dict[str, torch.Tensor]) -> None:
    sd["1.weight"] = torch.full_like(sd["1.weight"], float("nan"))


def _sparse_codes() -> torch.Tensor:
    return torch.zeros(8 * 64 // 4, dtype=torch.uint8)


# (case id, how to damage the loaded checkpoint dict, text the one-line error must contain)
CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("structure-not-a-list", _set("structure", {"kind": "prune_channels"}), "field 'structure' is of type dict"),
    ("structure-entry-not-a-dict", _set("structure", [5]), "field 'structure[0]' is of type int"),
    ("missing-modules", _set("structure", [{"kind": "prune_channels", "payload": {}}]), "'structure[0].payload.modules' (prune_channels): Field required"),
    ("missing-payload", _set("structure", [{"kind": "prune_channels"}]), "structure[0]': missing 'payload'"),
    ("unknown-kind", _set("structure", [{"kind": "prune_everything", "payload": {}}]), "'prune_everything'"),
    ("unknown-quant-target", _set("structure", [{"kind": "quant", "payload": {"target": "tpu"}}]), "'structure[0].payload.target' (quant): Input should be 'tensorrt' or 'onnxruntime'"),
    ("version-str", _set("version", "1"), "field 'version' is '1'"),
    ("version-bool", _set("version", True), "field 'version' is True"),
    ("version-newer", _set("version", 99), "format version 99 is newer"),
    ("format-int", _set("format", 1), "field 'format' is 1"),
    ("factory-int", _set("factory", 5), "field 'factory' is of type int"),
    ("kwargs-list", _set("kwargs", [8]), "field 'kwargs' is of type list"),
    ("kwargs-tensor-value", _set("kwargs", {"hidden": torch.tensor(8)}), "field 'kwargs.hidden' is of type Tensor"),
    ("kwargs-int-key", _set("kwargs", {1: 8}), "field 'kwargs' has key 1 of type int"),
    ("kwargs-deep", _set("kwargs", {"hidden": _nested(100)}), "nests more than 32 levels"),
    ("metadata-str", _set("metadata", "x"), "field 'metadata' is of type str"),
    ("unknown-field", _set("extra", 1), "unknown field 'extra'"),
    ("missing-state-dict", lambda c: c.pop("state_dict"), "field 'state_dict' is missing"),
    ("state-dict-list", _set("state_dict", [torch.zeros(1)]), "field 'state_dict' is of type list"),
    ("non-tensor-entry", _state(lambda sd: sd.__setitem__("1.weight", [[0.0]])), "field 'state_dict.1.weight' is of type list"),
    ("int-key", _state(lambda sd: sd.__setitem__(0, torch.zeros(1))), "has key 0 of type int"),
    ("sha256-int", _set("weights_sha256", 5), "field 'weights_sha256'"),
    ("payload-str", _set("structure", [{"kind": "prune_channels", "payload": "modules"}]), "'structure[0].payload' (prune_channels): Input should be"),
    ("payload-modules-list", _set("structure", _prune([1, 2])), "'structure[0].payload.modules' (prune_channels): Input should be a valid dict"),
    ("plan-bool-size", _set("structure", _prune({"1": {"attrs": {"out_features": True}}})),
     "'structure[0].payload.modules.1.attrs.out_features' (prune_channels): Input should be a valid integer"),
    ("plan-float-size", _set("structure", _prune({"1": {"shapes": {"bias": [4.0]}}})), "payload.modules.1.shapes.bias[0]' (prune_channels): Input should be a valid integer"),
    ("plan-zero-size", _set("structure", _prune({"1": {"shapes": {"bias": [0]}}})), "greater than or equal to 1"),
    ("plan-absurd-shape", _set("structure", _prune({"1": {"shapes": {"weight": [ABSURD, 64]}}})),
     f"modules.1.shapes.weight: shape [{ABSURD}, 64] does not fit"),
    ("plan-absurd-attr", _set("structure", _prune({"1": {"attrs": {"out_features": ABSURD}}})),
     f"modules.1.attrs.out_features: {ABSURD} does not fit"),
    ("plan-grows", _set("structure", _prune({"3": {"attrs": {"in_features": 16}, "shapes": {"weight": [10, 16]}}})),
     "modules.3.attrs.in_features: 16 does not fit"),
    ("plan-shape-rank", _set("structure", _prune({"1": {"shapes": {"weight": [4]}}})), "shape [4] does not fit"),
    ("plan-missing-module", _set("structure", _prune({"9": {"attrs": {"out_features": 4}}})),
     "resizes module '9', which the factory model lacks"),
    ("plan-tensor-as-module", _set("structure", _prune({"1.weight": {"attrs": {"out_features": 4}}})),
     "resizes module '1.weight'"),
    ("plan-setattr-method", _set("structure", _prune({"1": {"attrs": {"forward": 1}}})),
     "'forward' is not a size attribute of Linear '1'"),
    ("plan-setattr-private", _set("structure", _prune({"1": {"attrs": {"_parameters": 1}}})),
     "'_parameters' is not a size attribute"),
    ("plan-setattr-on-relu", _set("structure", _prune({"2": {"attrs": {"inplace": 1}}})), "'inplace' is not a size"),
    ("plan-unknown-tensor", _set("structure", _prune({"1": {"shapes": {"running_mean": [4]}}})),
     "resizes '1.running_mean', which the factory model lacks"),
    ("plan-unknown-key", _set("structure", _prune({"1": {"sizes": {}}})), "payload.modules.1.sizes' (prune_channels): Extra inputs"),
    ("sparsity-on-relu", _set("structure", [{"kind": "sparsity", "payload": {"pattern": "2:4",
                                                                            "layers": {"2": _sparse_codes()}}}]),
     "'2' is a ReLU"),
    ("sparsity-codes-list", _set("structure", [{"kind": "sparsity", "payload": {"pattern": "2:4", "layers": {"1": [0]}}}]),
     "payload.layers.1' (sparsity): Input should be an instance of Tensor"),
    ("sparsity-codes-misfit", _set("structure", [{"kind": "sparsity", "payload": {
        "pattern": "2:4", "layers": {"1": torch.zeros(3, dtype=torch.uint8)}}}]), "mask of layer '1' does not fit"),
    ("altered-weights", _state(lambda sd: sd["1.weight"].add_(0.5)), "weights changed since saved"),
    ("renamed-tensor", _state(lambda sd: sd.__setitem__("1.w", sd.pop("1.weight"))), "weights changed since saved"),
    ("all-nan-weights", _state(_nan_weight, rehash=True), "tensor '1.weight' holds NaN or Inf (512 of 512 values)"),
    ("meta-tensor", _state(lambda sd: sd.__setitem__("1.weight", torch.empty(8, 64, device="meta"))),
     "field 'state_dict.1.weight' is a meta tensor"),  # was a traceback: no data to hash or check
    ("meta-tensor-no-hash", lambda c: (c.pop("weights_sha256"), c["state_dict"].__setitem__(
        "1.weight", torch.empty(8, 64, device="meta"))), "field 'state_dict.1.weight' is a meta tensor"),
    ("float8-nan", _state(lambda sd: sd.__setitem__("1.weight", torch.full((8, 64), float("nan")).to(
        torch.float8_e4m3fn)), rehash=True), "tensor '1.weight' holds NaN or Inf (512 of 512 values)"),  # no isfinite kernel
    ("complex-into-real", _state(lambda sd: sd.__setitem__("1.weight", sd["1.weight"] * (1 + 1j)), rehash=True),
     "complex into real: 1.weight checkpoint torch.complex64 vs model torch.float32"),  # loaded, imaginary part dropped
    ("one-inf-bias", _state(lambda sd: sd["3.bias"].__setitem__(0, float("inf")), rehash=True),
     "tensor '3.bias' holds NaN or Inf (1 of 10 values)"),
]


def _write(base: Path, path: Path, mutate: Callable[[dict[str, Any]], None]) -> Path:
    ckpt = torch.load(base, weights_only=True)
    mutate(ckpt)
    torch.save(ckpt, path)
    return path


def _check_args(bad: Path, reference: Path, tmp_path: Path) -> tuple[Any, ...]:
    return ("check", bad, "--reference", reference, "--data", "digits:test", "--report", tmp_path / "c.json")


@pytest.mark.parametrize(("case", "mutate", "expected"), CASES, ids=[c[0] for c in CASES])
def test_malformed_checkpoint_is_refused_in_one_line_naming_file_and_field(case, mutate, expected, mlp_checkpoint,
                                                                           tmp_path, cli) -> None:
    bad = _write(mlp_checkpoint, tmp_path / f"{case}.pt", mutate)
    message = one_line_error(CheckpointError, compress.load, bad)
    assert message.startswith(f"checkpoint {bad}") and expected in message, message
    assert expected in cli(*_check_args(bad, mlp_checkpoint, tmp_path)).error_line()


def test_malformed_checkpoints_are_refused_by_validate_and_as_reference(mlp_checkpoint, tmp_path, cli,
                                                                        write_recipe) -> None:
    for case, mutate, expected in CASES[::7]:  # a spread of the kinds; every one is covered through `check` above
        bad = _write(mlp_checkpoint, tmp_path / f"{case}.pt", mutate)
        recipe = write_recipe(f"name: bad\nmodel: {{checkpoint: {bad}}}\n"
                              "data: {eval: {source: digits, split: test}}\nstages: []\n")
        assert expected in cli("validate", recipe).error_line(), case
        reference = cli("check", mlp_checkpoint, "--reference", bad, "--data", "digits:test",
                        "--report", tmp_path / "c.json")
        assert expected in reference.error_line(), case


def test_malformed_files_naming_a_hostile_factory_run_nothing(mlp_checkpoint, tmp_path, cli) -> None:
    """The same damage on a file whose factory is ``os:system``: refused in one line, and the command never runs."""
    marker = tmp_path / "marker"

    def hostile(ckpt: dict[str, Any]) -> None:
        ckpt["factory"], ckpt["kwargs"] = "os:system", {"command": f"touch {marker}"}

    refused = 0
    for case, mutate, _ in CASES:
        bad = _write(mlp_checkpoint, tmp_path / f"{case}.pt", lambda c, m=mutate: (hostile(c), m(c)))
        one_line_error(CheckpointError, compress.load, bad)
        cli(*_check_args(bad, mlp_checkpoint, tmp_path)).error_line()
        refused += 1
    assert refused == len(CASES) and not marker.exists()


def test_absurd_plan_is_refused_before_allocating(mlp_checkpoint, tmp_path) -> None:
    """Replaying the plan would allocate 4e14 x 64 floats; the refusal must come from the size check."""
    bad = _write(mlp_checkpoint, tmp_path / "absurd.pt",
                 _set("structure", _prune({"1": {"attrs": {"out_features": ABSURD}, "shapes": {"weight": [ABSURD, 64]}}})))
    message = one_line_error(CheckpointError, compress.load, bad)
    assert "does not fit" in message and "pruning only shrinks" in message


def _data_offset(path: Path, member: str) -> int:
    """Where ``member``'s bytes start in the zip (after its local header, name and extra field)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def test_flipped_bytes_behind_a_stale_zip_crc_are_refused(mlp_checkpoint, tmp_path, cli) -> None:
    with zipfile.ZipFile(mlp_checkpoint) as zf:  # the largest record is 1.weight's 512 floats
        member = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename
    raw = bytearray(mlp_checkpoint.read_bytes())
    offset = _data_offset(mlp_checkpoint, member) + 101
    raw[offset] ^= 0x01  # one mantissa bit of one weight; the zip's CRC is left stale
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    edited = torch.load(bad, weights_only=True)["state_dict"]  # torch does not check the CRC: it loads
    original = torch.load(mlp_checkpoint, weights_only=True)["state_dict"]
    assert int((edited["1.weight"] != original["1.weight"]).sum()) == 1
    message = one_line_error(CheckpointError, compress.load, bad)
    assert "weights changed since saved" in message and str(bad) in message
    assert "weights changed since saved" in cli(*_check_args(bad, mlp_checkpoint, tmp_path)).error_line()


def test_nan_weights_in_a_plain_state_dict_are_refused_naming_the_tensor(tmp_path, cli, write_recipe) -> None:
    state = build(MLP, {"hidden": 8}).state_dict()
    state["3.weight"][2, 3] = float("nan")
    raw = tmp_path / "raw.pt"
    torch.save(state, raw)
    message = one_line_error(CheckpointError, load_model, raw, MLP, {"hidden": 8})
    assert message == (f"checkpoint {raw}: tensor '3.weight' holds NaN or Inf (1 of 80 values); "
                       "compress refuses non-finite weights")
    recipe = write_recipe(f"name: nan\nmodel: {{factory: '{MLP}', kwargs: {{hidden: 8}}, checkpoint: {raw}}}\n"
                          "data: {eval: {source: digits, split: test}}\nstages: []\n")
    assert "tensor '3.weight' holds NaN or Inf" in cli("validate", recipe).error_line()


def test_plain_state_dict_with_int_keys_is_refused(tmp_path) -> None:
    raw = tmp_path / "raw.pt"
    torch.save({0: torch.zeros(3), "1.weight": torch.zeros(8, 64)}, raw)
    assert "has key 0 of type int" in one_line_error(CheckpointError, load_model, raw, MLP, {"hidden": 8})


def test_files_without_a_hash_still_load(mlp_checkpoint, tmp_path) -> None:
    """Checkpoints from before the hash (and users' plain state_dicts) load as they did."""
    ckpt = torch.load(mlp_checkpoint, weights_only=True)
    digest = ckpt.pop("weights_sha256")
    assert digest == weights_digest(ckpt["state_dict"])
    torch.save(ckpt, tmp_path / "old.pt")
    model = compress.load(tmp_path / "old.pt")
    assert weights_digest(model.state_dict()) == digest
    torch.save(ckpt["state_dict"], tmp_path / "plain.pt")
    assert weights_digest(load_model(tmp_path / "plain.pt", MLP, {"hidden": 8}).state_dict()) == digest


def test_non_regular_files_and_overlong_names_are_one_line(tmp_path, cli, write_recipe) -> None:
    message = one_line_error(CheckpointError, compress.load, "/dev/zero")  # a device: reading it never ends
    assert message == "checkpoint /dev/zero: is not a regular file (a device, FIFO or socket), expected a checkpoint file"
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)  # opening a FIFO for reading would block until a writer comes
    assert "is not a regular file" in one_line_error(CheckpointError, compress.load, fifo)
    long = tmp_path / ("a" * 300 + ".pt")
    assert one_line_error(CheckpointError, compress.load, long) == f"checkpoint {long}: cannot open it: File name too long"
    # a recipe's overlong name is refused by the recipe schema already ("path too long ... at most 255 per name")
    for path, expected in (("/dev/zero", "is not a regular file"), (long, "path too long")):
        recipe = write_recipe(f"name: dev\nmodel: {{checkpoint: {path}}}\n"
                              "data: {eval: {source: digits, split: test}}\nstages: []\n")
        assert expected in cli("validate", recipe).error_line()


# ------------------------------------------------------------------------------------------------
# Good checkpoints: exact round trips, reproducible bytes


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_identical_content_saves_to_identical_bytes(tmp_path) -> None:
    torch.manual_seed(0)
    model = build(MLP, {"hidden": 8})
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "model.pt", tmp_path / "b" / "other-name.pt"
    compress.save(model, first)
    compress.save(copy.deepcopy(model), second)
    assert _sha(first) == _sha(second)
    with zipfile.ZipFile(first) as zf:  # not the temporary file's random name
        assert {n.split("/")[0] for n in zf.namelist()} == {"archive"}
    compress.save(compress.load(first), tmp_path / "again.pt")  # load then save: the same file again
    assert _sha(tmp_path / "again.pt") == _sha(first)


def _assert_round_trip(model: torch.nn.Module, path: Path, x: torch.Tensor) -> torch.nn.Module:
    compress.save(model, path)
    loaded = compress.load(path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True))
    assert torch.equal(loaded.eval()(x), model.eval()(x))  # same shapes, same weights: bit-identical outputs
    assert weights_digest(loaded.state_dict()) == torch.load(path, weights_only=True)["weights_sha256"]
    return loaded


def test_pruned_cnn_checkpoint_round_trips_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = build("compress.zoo:digits_cnn", {"num_classes": 10})
    x = torch.randn(4, 1, 8, 8)
    compress.prune.channels(model, x[:1], ratio=0.5)
    loaded = _assert_round_trip(model, tmp_path / "pruned.pt", x)
    plan = torch.load(tmp_path / "pruned.pt", weights_only=True)["structure"]
    assert [e["kind"] for e in plan] == ["prune_channels"]
    widths = [m.out_channels for m in loaded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    compress.save(loaded, tmp_path / "again.pt")
    assert _sha(tmp_path / "again.pt") == _sha(tmp_path / "pruned.pt")


def test_pruned_checkpoint_with_a_grown_plan_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    model = build("compress.zoo:digits_cnn", {"num_classes": 10})
    compress.prune.channels(model, torch.randn(1, 1, 8, 8), ratio=0.5)
    compress.save(model, tmp_path / "pruned.pt")
    ckpt = torch.load(tmp_path / "pruned.pt", weights_only=True)
    name, change = next((n, c) for n, c in ckpt["structure"][0]["payload"]["modules"].items() if "out_channels" in c["attrs"])
    factory_width = compress.build("compress.zoo:digits_cnn", {"num_classes": 10}).get_submodule(name).out_channels
    change["attrs"]["out_channels"] = factory_width + 1
    torch.save(ckpt, tmp_path / "grown.pt")
    message = one_line_error(CheckpointError, compress.load, tmp_path / "grown.pt")
    assert f"modules.{name}.attrs.out_channels: {factory_width + 1} does not fit" in message


def test_uncalibrated_quantized_checkpoint_loads_but_inf_amax_is_refused(tmp_path) -> None:
    """A quantizer's amax is NaN until calibrated: that NaN is "not set", not a damaged weight."""
    torch.manual_seed(0)
    qmodel = compress.quant.prepare(build(MLP, {"hidden": 8}), target="onnxruntime")
    x = torch.randn(4, 1, 8, 8)
    compress.save(qmodel, tmp_path / "q.pt")
    loaded = compress.load(tmp_path / "q.pt")
    amax = [k for k, v in loaded.state_dict().items() if k.endswith("amax") and bool(torch.isnan(v).all())]
    assert amax, "an uncalibrated quantizer keeps its NaN amax through the checkpoint"
    ckpt = torch.load(tmp_path / "q.pt", weights_only=True)
    ckpt["state_dict"][amax[0]] = torch.full_like(ckpt["state_dict"][amax[0]], float("inf"))
    ckpt["weights_sha256"] = weights_digest(ckpt["state_dict"])
    torch.save(ckpt, tmp_path / "inf.pt")
    assert f"tensor '{amax[0]}' holds NaN or Inf" in one_line_error(CheckpointError, compress.load, tmp_path / "inf.pt")
    with torch.no_grad():
        for _, q in compress.quant.quantizers(qmodel):
            q.set_amax(torch.full(q.amax.shape, 2.0))
    compress.quant.refresh_weight_amax(qmodel)  # weight ranges are max |w| (the layers keep them so in forward)
    _assert_round_trip(qmodel, tmp_path / "calibrated.pt", x)


def test_a_foreign_wrapper_with_its_own_format_key_still_loads_as_a_state_dict(tmp_path) -> None:
    torch.manual_seed(0)
    state = build(MLP, {"hidden": 8}).state_dict()
    torch.save({"format": "lightning", "epoch": 3, "state_dict": state}, tmp_path / "wrapped.pt")
    loaded = load_model(tmp_path / "wrapped.pt", MLP, {"hidden": 8})
    assert weights_digest(loaded.state_dict()) == weights_digest(state)


def test_float8_and_bfloat16_weights_load_and_convert(mlp_checkpoint, tmp_path) -> None:
    """Finite low-precision weights are checked (float8 has no isfinite kernel) and load into the float model."""
    good = compress.load(mlp_checkpoint).state_dict()
    for dtype in (torch.float8_e4m3fn, torch.bfloat16):
        path = _write(mlp_checkpoint, tmp_path / f"{dtype}.pt",
                      _state(lambda sd, dtype=dtype: sd.__setitem__("1.weight", sd["1.weight"].to(dtype)), rehash=True))
        loaded = compress.load(path).state_dict()["1.weight"]
        assert torch.equal(loaded, good["1.weight"].to(dtype).float())


def test_kwargs_that_would_build_a_huge_model_are_refused_before_allocating(tmp_path) -> None:
    """The factory is trusted, but the file's kwargs ask for hidden=10^8 (7.5 x 10^9 float32 weights, 27.9 GiB):
    the meta-device probe refuses it in milliseconds instead of allocating and filling it."""
    path = tmp_path / "mlp.pt"
    compress.save(build("compress.zoo:digits_mlp", {"hidden": 8}), path)
    obj = torch.load(path, weights_only=True)
    obj["kwargs"] = {"hidden": 10**8}
    torch.save(obj, path)
    message = one_line_error(CheckpointError, compress.load, path)
    assert "would build a model of 27.9 GiB, but the file holds 2.4 KiB of weights" in message, message
    obj["kwargs"] = {"hidden": 8}  # the honest file still loads
    torch.save(obj, path)
    assert isinstance(compress.load(path), torch.nn.Module)
