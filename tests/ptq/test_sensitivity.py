"""compress.ptq.sensitivity and compress.ptq.fallback on a trained digits CNN with one layer made sensitive.

Digits test split (360 samples): one sample is 0.28 points of top-1. The planted outlier channel
(tests/helpers_budget.py) costs ~85 points alone; every other unit alone moves top-1 by a few samples at most.
"""

from __future__ import annotations

import pytest
import torch
from helpers_budget import SENSITIVE, outlier_model, sensitive_model
from helpers_quant import digits, top1

from compress import ptq, quant, report
from compress.errors import CompressError, DataError

SAMPLE = 100 / 360  # one sample of the digits test split, in points


@pytest.fixture(scope="module")
def model(digits_cnn_checkpoint):
    return sensitive_model(digits_cnn_checkpoint)


@pytest.fixture(scope="module")
def val():
    return digits("test", 360)


def test_sensitivity_ranks_the_planted_layer_first_and_states_its_cost(model, val):
    lines: list[str] = []
    units = quant.units(model)
    table = ptq.sensitivity(model, val, "top1", announce=lines.append)
    assert ptq.planned_passes(model) == 2 * len(units) + 2 == table.passes == 20  # 7 layers, 2 residual adds
    assert lines == ["sensitivity: 9 quantized units, 20 forward passes over the data (2 per unit, 1 float, 1 all-INT8)"]
    assert [r.name for r in table.rows] == [u.name for u in units]
    top = table.ranked()[0]
    assert top.name == SENSITIVE
    assert top.drop_alone > 50 and top.recovery_alone > 50  # the fault: ~85 points either way
    assert top.fidelity_alone < 0.5 < 0.999 < top.fidelity_float  # cosine with the float outputs
    for row in table.rows:
        if row.name != SENSITIVE:
            assert abs(row.drop_alone) <= 3 * SAMPLE + 1e-6  # 3 samples at most (per-layer rounding flips a few)
    assert table.drop == pytest.approx(100 * (table.float_score - table.int8_score), abs=1e-3)
    assert table.macs > 0 and {r.name: r.macs for r in table.rows}[SENSITIVE] == 32 * 32 * 9 * 8 * 8
    assert all(q.quant_enabled for _, q in quant.quantizers(model))  # every switch restored
    row = table.to_dict()["layers"][0]
    assert set(row) == {"name", "kind", "macs", "drop_alone", "recovery_alone", "fidelity_alone", "fidelity_float"}


def test_sensitivity_on_unlabeled_data_with_a_label_free_metric(model, val):
    unlabeled = [x for x, _ in val]
    table = ptq.sensitivity(model, unlabeled, "agreement")
    assert table.float_score == 1.0 and table.ranked()[0].name == SENSITIVE
    with pytest.raises(DataError, match="metric top1 needs labels and the data has none; use metric: agreement"):
        ptq.sensitivity(model, unlabeled, "top1")
    assert all(q.quant_enabled for _, q in quant.quantizers(model))


def test_sensitivity_refuses_what_it_cannot_measure(model, val, digits_cnn_checkpoint):
    import compress

    with pytest.raises(CompressError, match="one-shot iterator"):
        ptq.sensitivity(model, iter(val))
    with pytest.raises(CompressError, match="has no quantizers"):
        ptq.sensitivity(compress.load(digits_cnn_checkpoint), val)


def test_fallback_puts_exactly_the_planted_layer_in_float_and_meets_the_budget(digits_cnn_checkpoint, val):
    qmodel = sensitive_model(digits_cnn_checkpoint)
    saved: list[ptq.Fallback] = []
    result = ptq.fallback(qmodel, val, max_drop=0.3, on_step=saved.append)
    assert result.met and result.gap == 0
    assert result.step.float_units == [SENSITIVE] and quant.float_units(qmodel) == [SENSITIVE]
    assert [s.float_units for s in result.steps] == [[], [SENSITIVE]]
    # the search so far: after step 0, after the table (still step 0), after step 1
    assert [s.step for s in saved] == [result.steps[0], result.steps[0], result.steps[1]]
    assert not saved[0].sensitivity.measured and saved[1].sensitivity.measured and saved[-1].steps == result.steps
    assert result.steps[0].drop > 50 and result.step.drop <= 0.3 and result.step.confirm_drop <= 0.3
    assert result.confirm_samples == 180 and result.sensitivity.samples == 180  # half of the 360 held out
    # all-INT8 on both parts (float and INT8 each: 4), the rest of the table on the search part (2 per unit), then
    # step 1 on both parts
    assert result.passes == 4 + 2 * 9 + 2 and result.sensitivity.passes == 20
    macs = {r.name: r.macs for r in result.sensitivity.rows}
    assert result.step.int8_macs_share == pytest.approx(1 - macs[SENSITIVE] / result.sensitivity.macs, abs=1e-4)
    assert 100 * (result.sensitivity.float_score - top1(qmodel, val)) <= 0.3  # the model is left as measured
    assert "budget 0.3 pt met" in result.summary()


def test_fallback_that_cannot_meet_the_budget_keeps_the_closest_model(digits_cnn_checkpoint, val):
    qmodel = sensitive_model(digits_cnn_checkpoint)
    # a second, milder fault (input range x64: a dozen of the 360 digits flip): one float unit cannot fix both
    (unit,) = [u for u in quant.units(qmodel) if u.name == "layer1.conv1"]
    qmodel.get_submodule(unit.quantizers[0]).amax *= 64
    result = ptq.fallback(qmodel, val, max_drop=0.0, max_units=1)
    assert not result.met and result.gap == result.step.decisive_drop > 1
    assert result.step.decisive_drop == max(result.step.drop, result.step.confirm_drop)  # the worse part counts
    assert len(result.steps) == 2 and result.kept == 1  # the planted layer float is closer than none
    assert result.step.float_units == [SENSITIVE]
    assert quant.float_units(qmodel) == result.step.float_units
    assert "not met (closest:" in result.summary()


def test_fallback_with_no_drop_changes_nothing_and_measures_no_table(digits_cnn_checkpoint, val, tmp_path):
    qmodel = sensitive_model(digits_cnn_checkpoint, outlier=1.0)
    lines: list[str] = []
    result = ptq.fallback(qmodel, val, max_drop=5.0, announce=lines.append)
    assert result.met and result.steps[0].float_units == [] and len(result.steps) == 1
    assert quant.float_units(qmodel) == [] and all(q.quant_enabled for _, q in quant.quantizers(qmodel))
    # the all-INT8 model met the budget on both parts: float and INT8 on each, and no per-unit pass
    assert result.passes == 4 and result.sensitivity.passes == 2 and not result.sensitivity.measured
    assert "the all-INT8 model first (4 passes)" in lines[0]
    units = quant.units(qmodel)
    rows = result.sensitivity.rows
    assert [r.name for r in rows] == [u.name for u in units]
    assert all(r.drop_alone is None and r.recovery_alone is None for r in rows)
    assert {r.name: r.macs for r in rows}[SENSITIVE] == 32 * 32 * 9 * 8 * 8  # MACs are known without the table
    assert result.step.int8_macs_share == pytest.approx(sum(r.macs for r in rows) / result.sensitivity.macs, abs=1e-4)

    # with an engine: one more pass, the engine over the confirm part
    from compress.export.onnx import export_onnx
    from compress.export.onnxruntime import OrtEngine

    def engine(model):
        export_onnx(model, next(iter(val))[0][:1], tmp_path / "all_int8.onnx")
        return OrtEngine(tmp_path / "all_int8.onnx")

    confirmed = ptq.fallback(sensitive_model(digits_cnn_checkpoint, "onnxruntime", outlier=1.0), val, max_drop=5.0,
                             engine=engine)
    assert confirmed.met and confirmed.passes == 5 and not confirmed.sensitivity.measured
    assert confirmed.step.engine_drop is not None and confirmed.step.engine_drop <= 5.0

    # the report: units with their MACs, the per-unit figures said to be not measured, the path panel alone
    entry = {"type": "ptq", "metrics": {"top1": 0.99}, "params": 1, "macs": 1, "budget": {**result.to_dict(), "split": "val"}}
    doc = {"recipe": "r", "metric": "top1", "passed": True, "baseline": {"metrics": {"top1": 0.99}, "params": 1, "macs": 1},
           "stages": [entry]}
    md = report.markdown(doc)
    assert f"| `{SENSITIVE}` | layer | {32 * 32 * 9 * 8 * 8:,} |" in md
    assert md.count(report.NOT_MEASURED) == 2 * len(units) and "confirm: 180 samples, 1 sample = 0.5556 pt." in md
    assert report.plot_budget(doc, tmp_path / "budget.png")
    png = (tmp_path / "budget.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 550  # one panel: 5.5 in at 100 dpi


def test_two_faults_that_each_break_the_model_alone_are_floated_first(digits_cnn_checkpoint, val):
    qmodel = sensitive_model(digits_cnn_checkpoint)
    second = "layer1.conv1"
    (unit,) = [u for u in quant.units(qmodel) if u.name == second]
    qmodel.get_submodule(unit.quantizers[0]).amax *= 300  # its input rounds to a few levels: the model breaks
    result = ptq.fallback(qmodel, val, max_drop=0.3)
    rows = {r.name: r for r in result.sensitivity.rows}
    for name in (SENSITIVE, second):  # either float alone leaves the other fault: recovery alone cannot see them
        assert rows[name].drop_alone > 50 and rows[name].recovery_alone < 10
    assert set(result.steps[2].float_units) == {SENSITIVE, second}  # harm (drop alone here) ranks them first
    assert result.met and result.kept == 2 and set(quant.float_units(qmodel)) == {SENSITIVE, second}


@pytest.mark.parametrize("kwargs, message", [({"max_drop": -0.1}, "max_drop must be at least 0"),
                                             ({"max_drop": float("nan")}, "max_drop must be at least 0"),
                                             ({"max_drop": 1, "max_units": -1}, "max_units must be at least 0")])
def test_fallback_refuses_bad_budgets(model, val, kwargs, message):
    with pytest.raises(CompressError, match=message):
        ptq.fallback(model, val, **kwargs)



def test_fallback_confirms_the_budget_on_an_onnx_runtime_engine(digits_cnn_checkpoint, val, tmp_path):
    from compress.export.onnx import export_onnx
    from compress.export.onnxruntime import OrtEngine

    qmodel = sensitive_model(digits_cnn_checkpoint, "onnxruntime")
    example = next(iter(val))[0][:1]
    built: list[int] = []

    def engine(model):
        path = tmp_path / f"step{len(built)}.onnx"
        built.append(sum(q.quant_enabled for _, q in quant.quantizers(model)))  # the step's state, as exported
        export_onnx(model, example, path)
        return OrtEngine(path)

    result = ptq.fallback(qmodel, val, max_drop=0.3, engine=engine)
    assert result.met and result.step.float_units == [SENSITIVE]
    assert built == [sum(q.quant_enabled for _, q in quant.quantizers(qmodel))]  # one engine: the step that met it
    assert result.steps[0].engine_drop is None and result.step.engine_drop <= 0.3
    # INT8 kernels round differently from the fake-quant model: within 2 samples of it
    assert abs(result.step.engine_score - result.step.score) <= 2 / 360 + 1e-6


def test_an_interrupted_fallback_resumes_from_its_saved_search(digits_cnn_checkpoint, val):
    saved: list[dict] = []
    first = ptq.fallback(sensitive_model(digits_cnn_checkpoint), val, max_drop=0.3,
                         on_step=lambda search: saved.append(search.to_dict()))
    interrupted = ptq.Fallback.from_dict(saved[1])  # saved after step 0 and the table, before step 1
    assert [s.float_units for s in interrupted.steps] == [[]] and interrupted.sensitivity.measured
    qmodel = sensitive_model(digits_cnn_checkpoint)
    resumed = ptq.fallback(qmodel, val, max_drop=0.3, resume=interrupted)
    # the float outputs of each part once, then step 1 on each; no table passes
    assert resumed.resumed and resumed.passes == 4
    assert resumed.steps == first.steps and quant.float_units(qmodel) == [SENSITIVE]
    # interrupted before the table was done: step 0 is reused, the table measured (the float outputs, 2 per unit)
    early = ptq.fallback(sensitive_model(digits_cnn_checkpoint), val, max_drop=0.3,
                         resume=ptq.Fallback.from_dict(saved[0]))
    assert early.resumed and early.passes == 1 + 2 * 9 + 1 + 2 and early.steps == first.steps
    # a search of another model (other units), or of another split of the data, is not reused
    other = sensitive_model(digits_cnn_checkpoint, "onnxruntime")
    fresh = ptq.fallback(other, val, max_drop=0.3, resume=interrupted)
    assert not fresh.resumed and fresh.passes == 4 + 2 * len(fresh.sensitivity.rows) + 2
    resplit = ptq.fallback(sensitive_model(digits_cnn_checkpoint), val, max_drop=0.3, confirm=0.25, resume=interrupted)
    assert not resplit.resumed and resplit.confirm_samples == 90


def test_an_attentions_matmul_quantizers_are_one_unit_and_rank_first_when_they_break_it():
    from compress.zoo import vit_tiny

    torch.manual_seed(0)
    model = vit_tiny()
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: every output 0
    x = torch.randn(64, 3, 32, 32)
    qmodel = quant.prepare(model, "tensorrt", example_input=x[:1])
    ptq.calibrate(qmodel, [x], "max")
    attention = "encoder.layers.encoder_layer_0.self_attention"
    # softmax probabilities (0..1) behind a range 1000x too wide: they all round to 0, the attention outputs nothing
    qmodel.get_submodule(f"{attention}.probs_quantizer").amax *= 1000
    table = ptq.sensitivity(qmodel, [x[:32], x[32:]], "agreement")  # unlabeled: agreement with the float model
    rows = {r.name: r for r in table.rows}
    assert table.passes == 2 * 21 + 2 and rows[attention].kind == "attention"  # 16 layers, 2 attentions, 3 adds
    assert rows[attention].macs == 2 * 17 * 17 * 64  # Q.K^T and A.V for 17 tokens of width 64
    assert table.ranked()[0].name == attention and rows[attention].recovery_alone > 30  # > 20 of 64 samples
    assert min(table.rows, key=lambda r: r.fidelity_alone).name == attention


def test_fallback_measures_the_drop_against_the_reference_model_when_given(digits_cnn_checkpoint, val):
    """After QAT the fine-tuned weights in float are not the model the user started from: ``reference`` is."""
    qmodel = sensitive_model(digits_cnn_checkpoint)
    weak = outlier_model(digits_cnn_checkpoint).eval()
    with torch.no_grad():
        weak.fc.weight.zero_()  # every logit its bias: one class for every digit, ~10 % top-1
    result = ptq.fallback(qmodel, val, max_drop=0.3, reference=weak)
    # the reference's score on the search part (one class for every digit: ~10 %), not the float model's ~99 %
    assert result.sensitivity.float_score < 0.2 and top1(weak, val) < 0.2
    # against that reference the all-INT8 model (~15 %) already meets the budget: nothing float, no table
    assert result.met and result.step.float_units == [] and not result.sensitivity.measured
