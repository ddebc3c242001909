"""Document values inside packed sequences (docs/DESIGN.md §2.9), single process.

Every sequence holds several documents cut at end-of-document tokens. The scorer records each
document span's part of the sequence's raw score from the same backward: the spans sum to the
sequence's score, and with megatron's reset attention masks and position ids each span is the
brute-force value of that document's own loss terms, through the API and through the pretraining
entry point (``data.reset_attention_mask``/``data.reset_position_ids``).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
import yaml

import oracle
from common import (
    EXACTNESS,
    case_shape,
    dumped_run_case,
    load_canonical_weights,
    make_data,
    manifest_for_tests,
    scored_forward_backward,
    token_losses,
)
from launcher import TESTS, torchrun
from pretrain_common import prepare_data, read_rows, tiny_config

pytestmark = pytest.mark.megatron


def _score(model, shape, train, validation, eod: int | None):
    """The result of one scored step with document values on (``eod``) or off."""
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.megatron import MegatronScorer

    scorer = MegatronScorer(model, validation, ScoringConfig(document_eod=eod))
    scored_forward_backward(scorer, model, shape, train)
    result = scorer.end_step(lr=1.0)
    scorer.detach()
    for p in model.parameters():
        p.grad = None
    return result


def _documents(result) -> dict[tuple[int, int], float]:
    c = result.documents.columns
    return {(int(s), int(d)): float(r) for s, d, r in zip(c["sample_id"], c["span"], c["raw"])}


def _sequences(result) -> dict[int, float]:
    c = result.records.columns
    return dict(zip(c["sample_id"].tolist(), c["raw"].tolist()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", ["layernorm-gelu-bias-untied", "rmsnorm-swiglu-nobias-tied-recompute"])
def test_with_reset_masks_each_document_is_its_brute_force_value(megatron_world, case, dtype):
    from inrun_megatron.megatron.model import build_gpt

    shape = case_shape(case, dtype)
    eod = shape.vocab_size - 1
    model = build_gpt(shape)
    load_canonical_weights(model, seed=3)
    train = make_data(shape, 2, 3, seed=5, eod=eod, reset_documents=True)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)
    result = _score(model, shape, train, validation, eod)
    ours = _documents(result)

    g_val = oracle.validation_gradient(model, validation, token_losses)
    reference = oracle.per_document_raw(model, train, token_losses, g_val, eod)
    assert sorted(ours) == sorted(reference)
    assert max(d for _, d in reference) >= 2, "the data must pack several documents per sequence"
    scale = max(abs(v) for v in reference.values())
    error = max(abs(ours[key] - reference[key]) for key in reference) / scale
    print(f"{case} {dtype}: max relative error per document vs brute force {error:.2e}")
    assert error <= EXACTNESS[dtype]
    # Documents differ (the comparison is per document, not only of sums); a document whose loss tokens
    # are all masked has no loss term and is 0.
    learned = [v for v in reference.values() if v != 0.0]
    assert len({round(v / scale, 6) for v in learned}) == len(learned) >= len(reference) // 2
    # The positions of each span are its document's.
    c = result.documents.columns
    for sid, span, n in zip(c["sample_id"], c["span"], c["span_tokens"]):
        batch = train[int(sid) // 3]
        assert n == len(oracle.document_positions(batch["tokens"][int(sid) % 3], eod)[span])


@pytest.mark.parametrize("mbs", [2, 1])
@pytest.mark.parametrize("case", ["layernorm-swiglu-bias-tied-rope", "rmsnorm-gelu-bias-untied-recompute"])
def test_document_partials_sum_to_the_sequence_score(megatron_world, case, mbs):
    """Without reset masks (tokens attend across documents) the spans are an attribution of the sequence's
    score: they sum to it, and the sequence's score is the one scored without document values, on the
    rules path even at micro-batch size 1 (``path="auto"``)."""
    from inrun_megatron.megatron.model import build_gpt

    shape = case_shape(case, torch.float64)
    eod = 0
    model = build_gpt(shape)
    load_canonical_weights(model, seed=4)
    train = make_data(shape, 3, mbs, seed=7, eod=eod)
    validation = make_data(shape, 2, 2, seed=8, first_id=10**6)
    result = _score(model, shape, train, validation, eod)
    plain = _score(model, shape, train, validation, None)
    assert plain.documents is None
    sequences, documents = _sequences(result), _documents(result)
    for sid, raw in sequences.items():
        spans = [documents[key] for key in sorted(documents) if key[0] == sid]
        assert len(spans) >= 2
        assert float(np.sum(spans)) == pytest.approx(raw, rel=1e-13, abs=0), sid
    reference = _sequences(plain)
    scale = max(abs(v) for v in reference.values())
    assert max(abs(sequences[s] - reference[s]) for s in reference) <= 1e-12 * scale
    values = result.documents.values
    assert np.array_equal(values, result.documents.columns["raw"])  # lr 1, no clipping


def test_verify_reports_span_rows_that_do_not_sum_to_their_sequence(megatron_world, tmp_path):
    """``inrun-scores verify`` checks that the document spans of each sequence sum to its raw score row
    (docs/DESIGN.md §1.8): the dump of a scored run passes, and the same dump with one span row altered
    on disk fails, naming the step and the sample; so does a missing span row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from inrun_megatron.analysis.commands import verify
    from inrun_megatron.records import part_steps

    run, eod, steps = tmp_path / "run", 0, 3
    manifest = manifest_for_tests(scoring={"document_eod": eod})
    shape = case_shape("layernorm-gelu-bias-untied", torch.float64)
    dumped_run_case(run, shape, manifest, n_micro=2, mbs=2, steps=steps, lr=0.1, seed=4, document_eod=eod)
    report = verify(run)
    assert report.ok, report.data["problems"]
    checked = report.data["checked"]["documents"]["validation"]
    assert checked["sequences"] == steps * 4 and checked["max_rel_error"] <= 1e-12

    def edit_largest_span(step: int, drop: bool) -> int:
        """Negate (or drop) the span row of ``step`` with the largest |raw| on disk; its sample id."""
        part = next(
            p
            for p in sorted((run / "documents").rglob("part-*.parquet"))
            if part_steps(p)[0] <= step <= part_steps(p)[1]
        )
        table = pq.read_table(part)
        raw = table.column("raw").to_numpy().copy()
        in_step = np.flatnonzero(table.column("step").to_numpy() == step)
        row = int(in_step[np.argmax(np.abs(raw[in_step]))])
        sample = table.column("sample_id")[row].as_py()
        if drop:
            edited = table.filter(pa.array(np.arange(table.num_rows) != row))
        else:
            raw[row] = -raw[row]  # the sequence's spans now sum to its raw score less twice this span's
            edited = table.set_column(table.schema.get_field_index("raw"), "raw", pa.array(raw))
        pq.write_table(edited.replace_schema_metadata(table.schema.metadata), part)  # the run id stays
        return sample

    altered = edit_largest_span(1, drop=False)
    report = verify(run)
    assert not report.ok and len(report.data["problems"]) == 1, report.data["problems"]
    problem = report.data["problems"][0]
    assert "document spans do not sum to the sequence's raw score for target 'validation' at steps 1 " in problem
    assert "(failing sequences: 1; worst relative error" in problem and f"at step 1, sample {altered};" in problem
    missing = edit_largest_span(2, drop=True)
    problem = verify(run).data["problems"][0]
    assert "at steps 1, 2 (failing sequences: 2;" in problem
    assert f"at step 1, sample {altered};" in problem or f"at step 2, sample {missing};" in problem


@pytest.mark.parametrize("reset", [True, False], ids=["reset-masks", "whole-sequence-mask"])
def test_entry_point_with_reset_masks_each_document_is_its_brute_force_value(tmp_path, reset):
    """A pretraining run with ``scoring.document_values``: with ``data.reset_attention_mask`` and
    ``data.reset_position_ids`` the first step's document rows are the brute-force values of each document's
    own loss terms (tests/workers/pretrain_document_oracle.py, on the run's own first batch, before the update);
    off, batches carry no mask and the sequence rows are the whole-sequence brute force, while the document
    rows are only an attribution of them (which shows the check can fail). Held-out and jsonl targets both."""
    data_dir = prepare_data(tmp_path)
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a short target", "and another one")))
    run = tmp_path / "run"
    config = tiny_config(
        data_dir,
        run,
        model={"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64},
        parallel={"tensor_model_parallel_size": 1},
        training={"train_iters": 1, "global_batch_size": 4, "micro_batch_size": 2, "seed": 7},
        optimizer={"lr_warmup_iters": 0},
        data={"reset_attention_mask": reset, "reset_position_ids": reset},
        validation={
            "targets": [{"name": "heldout-a", "source": "a", "sequences": 3}, {"name": "mine", "jsonl": str(jsonl)}]
        },
        scoring={"flush_every": 1, "document_values": True},
        checkpoint={"save_interval": None},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    found_at = tmp_path / "oracle.json"
    worker = TESTS / "workers" / "pretrain_document_oracle.py"
    proc = torchrun(worker, 1, "--config", str(path), env={"INRUN_ORACLE_OUT": str(found_at)})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    found = json.loads(found_at.read_text())
    assert found["batch_has_attention_mask"] == reset
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["data"]["reset_attention_mask"] == reset

    def relative_error(ours: dict, reference: dict) -> float:
        assert sorted(ours) == sorted(reference)
        return max(abs(ours[k] - reference[k]) for k in reference) / max(abs(v) for v in reference.values())

    rows = read_rows(run).to_pylist()
    sequences = {(r["target"], r["sample_id"]): r["raw"] for r in rows}
    reference = {(t, sid): raw for t, sid, raw in found["sequences"]}
    assert {t for t, _ in reference} == {"heldout-a", "mine"}
    assert relative_error(sequences, reference) <= EXACTNESS[torch.float32]

    spans = ds.dataset(run / "documents", format="parquet").to_table().to_pylist()
    documents = {(d["target"], d["sample_id"], d["span"]): d["raw"] for d in spans}
    per_document = {(t, sid, span): raw for t, sid, span, raw in found["documents"]}
    assert max(span for _, _, span in per_document) >= 1, "the data must pack several documents per sequence"
    error = relative_error(documents, per_document)
    print(f"reset={reset}: max relative error per document vs brute force {error:.2e}")
    if reset:
        assert error <= EXACTNESS[torch.float32]
    else:
        assert error > 100 * EXACTNESS[torch.float32]


def test_document_values_refuse_the_microbatch_path_second_order_and_other_adapters():
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.scorer import Scorer

    with pytest.raises(ValueError, match="only the per-layer rules give"):
        ScoringConfig(path="microbatch", document_eod=0)
    with pytest.raises(ValueError, match="curvature pass scores whole sequences"):
        ScoringConfig(document_eod=0, second_order=True)
    batch = {"tokens": torch.zeros(1, 4, dtype=torch.int64), "labels": torch.zeros(1, 4, dtype=torch.int64)}
    with pytest.raises(NotImplementedError, match="does not record document values"):
        Scorer([batch], ScoringConfig(document_eod=0))


def test_spans_start_where_megatron_resets_position_ids():
    """A span starts after each end-of-document input token, exactly where megatron's GPTDataset
    (``reset_position_ids``) restarts the positions; an EOD at the last position opens no span."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from inrun_megatron.scores import document_spans

    tokens = torch.randint(0, 4, (6, 40), generator=torch.Generator().manual_seed(0))
    tokens[0, -1] = 0
    spans = document_spans(tokens, 0)
    for row, span in zip(tokens, spans):
        _, _, positions = _get_ltor_masks_and_position_ids(row, 0, True, True, False, False)
        starts = torch.cat([torch.tensor([True]), span[1:] != span[:-1]])
        assert torch.equal(starts, positions == 0)
        assert span[0] == 0 and (span.diff() >= 0).all() and span.diff().max() <= 1


def test_token_positions_of_sites():
    """Per-token partials land at their positions: a whole-sequence site at 0..S-1, a sequence-parallel
    norm at its shard's; anything else, or a per-sample partial, is refused naming the layer."""
    from inrun_megatron.scores import StepScores, TokenLayout

    class Site:
        name, calls = "decoder_norm", 0

    step = StepScores(1, 1, 2, torch.device("cpu"), TokenLayout(8, shard_index=1, shard_count=2))
    step.add(0, torch.ones(1, 4, 2, dtype=torch.float64), Site())
    step.add(0, torch.arange(8, dtype=torch.float64).reshape(1, 8, 1).expand(1, 8, 2), Site())
    expected = torch.arange(8, dtype=torch.float64) + (torch.arange(8) >= 4)
    assert torch.equal(step.totals[0, 0, :, 0], expected) and torch.equal(step.totals[0, 0, :, 1], expected)
    with pytest.raises(RuntimeError, match="decoder_norm computed per-token partials for 3 positions"):
        step.add(0, torch.ones(1, 3, 2, dtype=torch.float64), Site())
    with pytest.raises(RuntimeError, match="decoder_norm gave per-sample scores"):
        step.add(0, torch.ones(1, 2, dtype=torch.float64), Site())
