"""``inrun-scores`` on real (tiny) training dumps and on synthetic dumps: answers checked against
independent computations, every output format, and bad input (each a clear error naming the file,
nothing written)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from inrun_megatron.analysis import cli
from inrun_megatron.analysis.bench import cli_command, mpi_env, mpirun_command, same_files
from inrun_megatron.analysis.dump import DumpError, ScoreDump
from inrun_megatron.analysis.inputs import Scores
from inrun_megatron.analysis.merge import merge
from inrun_megatron.analysis.stats import distribution, select_best
from inrun_megatron.analysis.synthetic import SyntheticRun, write_synthetic_dump
from inrun_megatron.analysis.values import MergedValues
from inrun_megatron.records import SCHEMA_VERSION, ScoreWriter, part_metadata, write_manifest

from common import manifest_for_tests

SYNTHETIC = SyntheticRun(steps=24, replicas=3, targets=("web", "code"), epochs=3, flush_every=5, skipped_steps=(7,))


def scores_cli(*args, capsys, expect: int = 0) -> dict | str:
    """Run ``inrun-scores ARGS --json`` in this process, expecting exit code ``expect``; return the
    parsed answer (or, for bad input, the error text)."""
    code = cli.main([*map(str, args), "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == expect, out + err
    return json.loads(out) if code in (0, 1) else err


def reference_values(run: Path) -> dict[tuple[str, int], float]:
    """Accumulated values straight from the rows, in plain Python: sum of value over non-skipped rows."""
    rows = ds.dataset(run / "scores", format="parquet").to_table().to_pylist()
    totals: dict[tuple[str, int], float] = defaultdict(float)
    for row in rows:
        totals[(row["target"], row["sample_id"])] += 0.0 if row["skipped"] else row["value"]
    return dict(totals)


def merged_values(out: Path) -> dict[tuple[str, int], float]:
    table = ds.dataset(out / "values", format="parquet").to_table()
    return {(t, s): v for t, s, v in zip(*(table[c].to_pylist() for c in ("target", "sample_id", "value")))}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic_dump(tmp_path_factory.mktemp("synthetic") / "run", SYNTHETIC)


@pytest.fixture
def copy_of(tmp_path):
    def copy(run: Path) -> Path:
        return Path(shutil.copytree(run, tmp_path / "copy"))

    return copy


# ---------------------------------------------------------------------------------------------
# a real training run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, megatron_world):
    """Six plain-SGD steps of a float64 megatron GPT over two epochs of the same data, dumped."""
    from inrun_megatron.megatron.model import GPTShape

    from common import CASES, run_case

    run = tmp_path_factory.mktemp("real") / "run"
    write_manifest(run, manifest_for_tests())
    writer = ScoreWriter(run, dp_rank=0, flush_every=4)
    shape = GPTShape(num_layers=2, params_dtype=torch.float64, **CASES["layernorm-gelu-bias-untied"])
    result = run_case(shape, n_micro=2, mbs=3, steps=6, lr=0.5, seed=21, epoch_steps=3, writer=writer)
    writer.close()
    return run, result


@pytest.mark.megatron
def test_real_run_merge_equals_the_scorers_values(real_run, tmp_path, capsys):
    run, result = real_run
    answer = scores_cli("merge", run, "-o", tmp_path / "merged", "--per-step", capsys=capsys)
    assert answer["rows"] == 36 and answer["samples"] == {"validation": 18}
    merged = merged_values(tmp_path / "merged")
    expected = result["values"]  # the scorer's own ValueAccumulator over the run
    assert sorted(sid for _, sid in merged) == sorted(expected)
    for (_, sid), value in merged.items():
        assert value == pytest.approx(expected[sid], rel=1e-12, abs=0)
    per_step = ds.dataset(tmp_path / "merged" / "values", format="parquet").to_table()
    assert set(per_step["n_steps"].to_pylist()) == {2}  # every sample trained in both epochs

    traj = scores_cli("trajectory", tmp_path / "merged", "--sample", 1004, capsys=capsys)
    steps = traj["samples"]["1004"]
    assert steps["step"] == [1, 4]
    assert steps["raw"] == pytest.approx([result["raw"][1][1004], result["raw"][4][1004]], rel=1e-12)
    assert steps["cumulative"][-1] == pytest.approx(expected[1004], rel=1e-12)


@pytest.mark.megatron
def test_real_run_summary_verify_and_top(real_run, capsys):
    run, result = real_run
    report = scores_cli("verify", run, capsys=capsys)
    assert report["ok"], report["problems"]
    summary = scores_cli("summary", run, capsys=capsys)
    assert summary["steps"] | {"missing": [], "skipped": []} == summary["steps"]
    assert summary["steps"]["count"] == 6 and summary["run"]["rows"] == 36
    efficiency = summary["targets"]["validation"]["efficiency"]
    assert efficiency["steps_measured"] == 6
    assert efficiency["max_rel_error"] <= 1e-9  # float64 run: sum of raw = <g_t, G_t> per step
    assert efficiency["batch_dot_sum"] == pytest.approx(sum(e[1] for e in result["efficiency"]), rel=1e-12)
    value = summary["targets"]["validation"]["value"]
    assert value["total"] == pytest.approx(sum(result["values"].values()), rel=1e-9)
    assert value["negative"] == pytest.approx(np.mean([v < 0 for v in result["values"].values()]))
    assert "lowered the validation loss" in summary["sign"]

    values = result["values"]
    for flag, pick in (((), max), (("--bottom",), min)):
        answer = scores_cli("top", run, "-k", 3, *flag, capsys=capsys)
        ids = [row["sample_id"] for row in answer["samples"]]
        assert ids[0] == pick(values, key=values.get)
        assert ids == sorted(values, key=values.get, reverse=not flag)[:3]
        assert any("no data section" in note for note in answer["notes"])  # API-only run: no text


@pytest.mark.megatron
@pytest.mark.slow
def test_data_parallel_run_with_clipping(tmp_path, capsys):
    """Two DP replicas (megatron DDP, gradient clipping) each dump their shard; merged, they give
    each replica's scorer values, and the efficiency identity holds across the shards."""
    from inrun_megatron.megatron.model import GPTShape

    from common import CASES, shape_to_json
    from launcher import launch

    run = tmp_path / "run"
    shape = GPTShape(num_layers=2, **CASES["rmsnorm-gelu-bias-untied-recompute"])
    options = dict(shape=shape_to_json(shape), n_micro=2, mbs=2, steps=4, lr=0.5, seed=9, epoch_steps=2)
    options |= dict(ddp={}, clip_grad=0.05)
    ranks = launch("score_dump.py", 2, tmp_path, str(run), json.dumps(options))
    assert all(c < 1.0 for c in ranks[0]["clip_coef"])  # every step clipped
    expected = {**ranks[0]["values"], **ranks[1]["values"]}
    assert len(expected) == len(ranks[0]["values"]) + len(ranks[1]["values"]) == 16  # disjoint replicas

    answer = scores_cli("merge", run, "-o", tmp_path / "merged", capsys=capsys)
    assert answer["rows"] == 32 and answer["samples"] == {"validation": 16}
    merged = merged_values(tmp_path / "merged")
    assert {sid: v for (_, sid), v in merged.items()} == pytest.approx(expected, rel=1e-12, abs=0)
    report = scores_cli("verify", run, capsys=capsys)
    assert report["ok"] and report["checked"]["replicas"] == 2, report["problems"]
    summary = scores_cli("summary", tmp_path / "merged", capsys=capsys)
    efficiency = summary["targets"]["validation"]["efficiency"]
    assert efficiency["steps_measured"] == 4 and efficiency["max_rel_error"] <= 1e-5  # fp32 scores
    assert efficiency["batch_dot_sum"] == pytest.approx(sum(e[1] for e in ranks[0]["efficiency"]), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# a real training run on indexed datasets (a data section: sources, documents, text)

SOURCES = {
    "prose": "the quick brown fox jumps over a lazy dog while cats sleep in the warm sun",
    "code": "def main ( ) : return x + 1 if y else None # for i in range ( 10 ) : print ( i )",
    "numbers": "one two three four five six seven eight nine ten 11 12 13 14 15 16",
}


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, megatron_world):
    """Six scored steps of a GPT on a blend of three indexed sources, dumped with the run's data section."""
    import random

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from inrun_megatron.data import open_sample_index, train_bpe
    from inrun_megatron.data.datasets import Source, batch_iterator, build_training_data
    from inrun_megatron.data.indexed import preprocess
    from inrun_megatron.data.validation_sets import TargetSpec, build_targets
    from inrun_megatron.megatron import MegatronScorer
    from inrun_megatron.megatron.model import GPTShape, build_gpt, gpt_forward_step

    root = tmp_path_factory.mktemp("data_run")
    rng = random.Random(0)
    docs = [
        {"text": " ".join(rng.choice(words.split()) for _ in range(rng.randint(5, 40))), "source": name}
        for _ in range(40)
        for name, words in SOURCES.items()
    ]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tokenizer = train_bpe([d["text"] for d in docs], 200, root / "tokenizer.json")
    preprocess([root / "corpus.jsonl"], root / "indexed", tokenizer)
    run = root / "run"
    sources = [Source(name, str(root / "indexed" / name), 1.0) for name in SOURCES]
    data = build_training_data(
        sources, tokenizer, seq_length=16, seed=3, split="90,10,0", train_samples=48, cache_dir=run / "cache"
    )
    write_manifest(run, manifest_for_tests(data=data.manifest_section(tokenizer.spec(), run)))
    targets = build_targets(
        [TargetSpec("prose", source="prose", sequences=4)], data, tokenizer, seq_length=16, micro_batch_size=4
    )
    model = build_gpt(GPTShape(vocab_size=tokenizer.vocab_size, seq_length=16))
    writer = ScoreWriter(run, dp_rank=0, flush_every=4)
    scorer = MegatronScorer(model, targets, sink=writer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = batch_iterator(data.train, consumed=0, micro_batch_size=4, dp_rank=0, dp_size=1)
    for _ in range(6):
        optimizer.zero_grad()
        scorer.forward_backward(
            get_forward_backward_func(),
            forward_step_func=gpt_forward_step,
            data_iterator=iter([next(batches), next(batches)]),
            model=model,
            num_microbatches=2,
            seq_length=16,
            micro_batch_size=4,
        )
        optimizer.step()
        scorer.end_step(lr=0.5)
    writer.close()
    scorer.detach()
    return run, open_sample_index(run)


@pytest.mark.megatron
def test_top_shows_source_documents_and_text(data_run, tmp_path, capsys):
    run, index = data_run
    merge(ScoreDump.open(run), tmp_path / "merged")
    for where in (run, tmp_path / "merged"):
        answer = scores_cli("top", where, "-k", 5, "--bottom", "--text-chars", 60, capsys=capsys)
        assert len(answer["samples"]) == 5 and not any("no data section" in n for n in answer["notes"])
        ids = np.array([row["sample_id"] for row in answer["samples"]])
        expected = index.lookup(ids).to_pylist()
        for row, truth in zip(answer["samples"], expected):
            assert row["source"] == truth["source"] and row["document_ids"] == truth["document_ids"]
            assert row["text"] == index.text(row["sample_id"], max_chars=60) and len(row["text"]) > 5
            words = re.split(r"\s+|<\|endoftext\|>", row["text"])[1:-1]  # the first and last may be cut
            assert set(words) - {""} <= set(SOURCES[row["source"]].split())  # the text of its source


@pytest.mark.megatron
def test_by_source_sums_and_curves(data_run, tmp_path, capsys):
    run, index = data_run
    merge(ScoreDump.open(run), tmp_path / "m")
    values = merged_values(tmp_path / "m")
    ids = np.array(sorted(sid for _, sid in values))
    source = dict(zip(ids.tolist(), index.lookup(ids).column("source").to_pylist()))
    expected: dict[str, list[float]] = defaultdict(list)
    for (_, sid), value in values.items():
        expected[source[sid]].append(value)
    answer = scores_cli("by-source", tmp_path / "m", capsys=capsys)
    assert sorted(r["source"] for r in answer["sources"]) == sorted(SOURCES)
    for row in answer["sources"]:
        mine = np.array(expected[row["source"]])
        assert row["samples"] == len(mine) and row["sum"] == pytest.approx(mine.sum(), rel=1e-12)
        assert row["mean"] == pytest.approx(mine.mean(), rel=1e-12)
        assert row["positive"] == pytest.approx((mine > 0).mean()) and row["negative"] == pytest.approx(
            (mine < 0).mean()
        )
    curves = scores_cli("trajectory", run, "--by-source", capsys=capsys)["sources"]
    for row in answer["sources"]:
        assert curves[row["source"]]["cumulative"][-1] == pytest.approx(row["sum"], rel=1e-9)

    exported = tmp_path / "values.csv"
    scores_cli("export", run, "-o", exported, "--format", "csv", "--with-source", capsys=capsys)
    table = pa.csv.read_csv(exported)
    assert [source[s] for s in table["sample_id"].to_pylist()] == table["source"].to_pylist()
    figures = scores_cli("plot", tmp_path / "m", "-o", tmp_path / "figures", capsys=capsys)["files"]
    assert {Path(f).name for f in figures} >= {"sources.png", "source_curves.png"}


@pytest.mark.megatron
def test_by_source_in_a_step_view(data_run, capsys):
    """by-source --view: per-source sums of the view's values (checked against numpy elsewhere)."""
    run, index = data_run
    with Scores(run) as scores:
        table = pa.Table.from_batches(scores.view("step-rank").batches("prose", ["sample_id", "value"]))
    ids, values = table["sample_id"].to_numpy(), table["value"].to_numpy()
    source = np.array(index.lookup(ids).column("source").to_pylist())
    answer = scores_cli("by-source", run, "--view", "step-rank", capsys=capsys)
    assert answer["view"]["name"] == "step-rank" and len(answer["sources"]) == len(SOURCES)
    for row in answer["sources"]:
        mine = values[source == row["source"]]
        assert row["samples"] == len(mine) and row["sum"] == pytest.approx(mine.sum(), rel=1e-12)
    # every sample is seen once, and a step's ranks average 1/2
    assert sum(r["sum"] for r in answer["sources"]) == pytest.approx(0.5 * len(values), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# synthetic dumps: merge


def test_merge_matches_the_rows_for_any_bucket_count(synthetic, tmp_path):
    dump = ScoreDump.open(synthetic)
    assert dump.num_rows == SYNTHETIC.rows and len(dump.replicas) == 3 and len(dump.score_parts) == 15
    reference = reference_values(synthetic)
    outputs = {}
    for buckets in (1, 4, 7):
        out = tmp_path / f"b{buckets}"
        found = merge(dump, out, buckets=buckets, per_step=True)
        assert found.samples == {"code": SYNTHETIC.samples, "web": SYNTHETIC.samples}
        got = merged_values(out)
        assert got.keys() == reference.keys()
        assert all(got[k] == pytest.approx(reference[k], rel=1e-12, abs=1e-18) for k in reference)
        outputs[buckets] = got
        merged = MergedValues.open(out)
        per_step = pa.concat_tables(pq.read_table(p) for p in merged.parts("per_step"))
        assert per_step.num_rows == SYNTHETIC.rows
        assert not list(tmp_path.glob(".*tmp*"))  # no work directory left behind
    assert outputs[1] == outputs[4] == outputs[7]  # sums in a fixed order: bit-identical


def test_merged_steps_carry_the_efficiency_identity_and_skips(synthetic, tmp_path):
    merge(ScoreDump.open(synthetic), tmp_path / "m", buckets=2)
    totals = MergedValues.open(tmp_path / "m").step_totals().to_pylist()
    assert len(totals) == SYNTHETIC.steps * 2
    for row in totals:
        assert row["rows"] == SYNTHETIC.global_batch
        if row["step"] == 7:
            assert row["skipped"] and row["skipped_rows"] == row["rows"] and row["value_sum"] == 0.0
        else:
            assert row["raw_sum"] == pytest.approx(row["batch_dot"], rel=1e-12)
            assert row["value_sum"] == pytest.approx(row["lr"] * row["clip_coef"] * row["batch_dot"], rel=1e-12)


@pytest.mark.slow
def test_mpi_merge_is_byte_identical_to_the_single_process_merge(synthetic, tmp_path):
    merge(ScoreDump.open(synthetic), tmp_path / "single", buckets=5, per_step=True)
    for ranks in (2, 4):
        out = tmp_path / f"mpi{ranks}"
        args = ("merge", synthetic, "-o", out, "--mpi", "--buckets", 5, "--per-step", "--quiet")
        proc = subprocess.run(mpirun_command(ranks, cli_command(*args)), env=mpi_env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert same_files(tmp_path / "single", out)


@pytest.mark.slow
def test_mpi_merge_fails_on_every_rank_when_one_rank_hits_a_corrupt_part(synthetic, copy_of, tmp_path):
    run = copy_of(synthetic)
    bad = sorted((run / "scores" / "dp00002").iterdir())[1]
    _corrupt_pages(bad)
    out = tmp_path / "out"
    args = ("merge", run, "-o", out, "--mpi", "--quiet")
    proc = subprocess.run(
        mpirun_command(3, cli_command(*args)), env=mpi_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert str(bad) in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# ---------------------------------------------------------------------------------------------
# synthetic dumps: the other commands


def test_summary_and_verify_of_a_multi_replica_dump(synthetic, capsys):
    summary = scores_cli("summary", synthetic, capsys=capsys)
    assert summary["steps"]["count"] == SYNTHETIC.steps and summary["steps"]["skipped"] == [7]
    assert summary["run"]["replicas"] == 3 and summary["run"]["targets"] == ["code", "web"]
    reference = reference_values(synthetic)
    for target in ("web", "code"):
        mine = np.array([v for (t, _), v in reference.items() if t == target])
        value = summary["targets"][target]["value"]
        assert value["count"] == SYNTHETIC.samples
        assert value["total"] == pytest.approx(mine.sum(), rel=1e-9)
        assert value["std"] == pytest.approx(mine.std(), rel=1e-9)
        assert value["negative"] == pytest.approx((mine < 0).mean())
        assert value["quantiles"]["p50"] == pytest.approx(np.median(mine), rel=1e-12)
        efficiency = summary["targets"][target]["efficiency"]
        assert efficiency["steps_measured"] == SYNTHETIC.steps - 1 and efficiency["violations"] == []
    report = scores_cli("verify", synthetic, capsys=capsys)
    assert report["ok"] and report["checked"]["duplicates"] == 0


def test_distribution_uses_a_hash_sample_beyond_its_cap():
    rng = np.random.default_rng(0)
    values = rng.standard_normal(200_000)
    batch = pa.record_batch({"sample_id": np.arange(len(values)), "value": values})
    exact = distribution([batch], len(values))
    sampled = distribution([batch], len(values), cap=20_000)
    assert exact.sampled is None and exact.quantiles["p50"] == pytest.approx(np.median(values), abs=0)
    assert 15_000 < sampled.sampled < 25_000  # about 1/10 of the ids
    assert sampled.mean == exact.mean and sampled.std == exact.std  # moments stay exact
    assert sampled.quantiles["p50"] == pytest.approx(np.median(values), abs=0.03)


def test_top_k_breaks_ties_by_sample_id():
    values = np.array([1.0, 3.0, 3.0, 2.0, 3.0, -1.0])
    ids = np.array([10, 14, 12, 11, 13, 15])
    assert ids[select_best(values, ids, 2)].tolist() == [12, 13]
    assert ids[select_best(values, ids, 2, bottom=True)].tolist() == [15, 10]
    assert ids[select_best(values, ids, 10)].tolist() == [12, 13, 14, 11, 10, 15]


def test_rank_correlations_handle_ties():
    from inrun_megatron.analysis.stats import rank_correlations

    a = np.array([1.0, 2, 2, 3, 3, 3, 4, 0.5])
    b = np.array([2.0, 1, 2, 3, 4, 4, 4, 0.5])
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    sign = [np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs]
    tied_a = sum(a[i] == a[j] for i, j in pairs)
    tied_b = sum(b[i] == b[j] for i, j in pairs)
    tau_b = (sign.count(1) - sign.count(-1)) / np.sqrt((len(pairs) - tied_a) * (len(pairs) - tied_b))

    def average_ranks(x):
        return np.array([(x < v).sum() + ((x == v).sum() + 1) / 2 for v in x])

    rho = np.corrcoef(average_ranks(a), average_ranks(b))[0, 1]
    got = rank_correlations(a, b)
    assert got["kendall_tau_b"] == pytest.approx(tau_b, rel=1e-12)
    assert got["spearman"] == pytest.approx(rho, rel=1e-12)


def test_compare_two_runs_and_two_targets(synthetic, tmp_path, capsys):
    merge(ScoreDump.open(synthetic), tmp_path / "a", buckets=3)
    same = scores_cli("compare", synthetic, tmp_path / "a", "--target", "web", "-k", 20, capsys=capsys)
    assert same["spearman"] == pytest.approx(1.0) and same["kendall_tau_b"] == pytest.approx(1.0)
    assert same["overlap"]["top"] == {"10": 1.0, "20": 1.0} and same["common_samples"] == SYNTHETIC.samples

    flipped = tmp_path / "flipped"
    write_synthetic_dump(flipped, SYNTHETIC)
    for path in (flipped / "scores").rglob("*.parquet"):  # the same run with every value negated
        table = pq.read_table(path)
        for name in ("raw", "value"):
            table = table.set_column(table.schema.get_field_index(name), name, pa.compute.negate(table[name]))
        pq.write_table(table, path)
    opposite = scores_cli("compare", tmp_path / "a", flipped, "--target", "web", "-k", 20, capsys=capsys)
    assert opposite["spearman"] == pytest.approx(-1.0) and opposite["kendall_tau_b"] == pytest.approx(-1.0)
    assert opposite["overlap"]["top"]["20"] == 0.0

    targets = scores_cli("compare", tmp_path / "a", "--target", "web", "--target-b", "code", capsys=capsys)
    assert 0.5 < targets["spearman"] < 1.0  # the same samples' quality drives both targets


def test_trajectory_from_a_dump_matches_the_rows(synthetic, capsys):
    rows = ds.dataset(synthetic / "scores", format="parquet").to_table().to_pylist()
    wanted = [r for r in rows if r["sample_id"] == 5 and r["target"] == "code"]
    traj = scores_cli("trajectory", synthetic, "--sample", 5, "--target", "code", capsys=capsys)
    got = traj["samples"]["5"]
    assert got["step"] == sorted(r["step"] for r in wanted) and len(got["step"]) == SYNTHETIC.epochs
    expected = sum(r["value"] for r in wanted if not r["skipped"])
    assert got["cumulative"][-1] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_export_round_trips(synthetic, tmp_path, fmt, capsys):
    out = tmp_path / f"values.{fmt}"
    answer = scores_cli("export", synthetic, "-o", out, "--format", fmt, "--target", "web", capsys=capsys)
    assert answer["rows"] == SYNTHETIC.samples
    if fmt == "csv":
        table = pa.csv.read_csv(out)
    elif fmt == "parquet":
        table = pq.read_table(out)
    else:
        table = pa.Table.from_pylist([json.loads(line) for line in out.read_text().splitlines()])
    reference = reference_values(synthetic)
    assert set(table["target"].to_pylist()) == {"web"}
    for sid, value in zip(table["sample_id"].to_pylist(), table["value"].to_pylist()):
        assert value == pytest.approx(reference[("web", sid)], rel=1e-12)
    answer = scores_cli(
        "export", synthetic, "-o", tmp_path / "rows.csv", "--format", "csv", "--per-step", capsys=capsys
    )
    assert answer["rows"] == SYNTHETIC.rows


def test_curate_drops_negative_and_lowest_samples(synthetic, tmp_path, capsys):
    reference = {sid: v for (t, sid), v in reference_values(synthetic).items() if t == "web"}
    keep, drop = tmp_path / "keep.txt", tmp_path / "drop.txt"
    answer = scores_cli(
        "curate", synthetic, "-o", keep, "--target", "web", "--drop-negative", "--dropped", drop, capsys=capsys
    )
    kept = {int(x) for x in keep.read_text().split()}
    dropped = {int(x) for x in drop.read_text().split()}
    assert kept == {sid for sid, v in reference.items() if v >= 0}
    assert dropped == set(reference) - kept and answer["dropped"] == len(dropped)
    assert answer["dropped_value"] == pytest.approx(sum(reference[s] for s in dropped), rel=1e-9)

    _answer = scores_cli("curate", synthetic, "-o", keep, "--target", "web", "--drop-fraction", 0.25, capsys=capsys)
    kept = {int(x) for x in keep.read_text().split()}
    lowest = sorted(reference, key=lambda s: (reference[s], s))[: round(0.25 * len(reference))]
    assert kept == set(reference) - set(lowest)


def test_plot_writes_png_figures(synthetic, tmp_path, capsys):
    answer = scores_cli("plot", synthetic, "-o", tmp_path / "figures", "--target", "code", capsys=capsys)
    names = sorted(Path(f).name for f in answer["files"])
    assert names == ["steps.png", "trajectories.png", "values_histogram.png"]
    for f in answer["files"]:
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    err = scores_cli("plot", synthetic, "-o", tmp_path / "figures", capsys=capsys, expect=2)
    assert "already exists" in err


def test_human_output_and_the_console_script(synthetic, capsys):
    assert cli.main(["top", str(synthetic), "-k", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "highest values, view accumulated (nats)" in out
    assert "sign: positive = the sample lowered the validation loss" in out
    script = Path(sys.executable).with_name("inrun-scores")
    proc = subprocess.run([script, "verify", synthetic], capture_output=True, text=True)
    assert proc.returncode == 0 and "OK" in proc.stdout


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the file, nothing written


def _corrupt_pages(path: Path) -> None:
    """Overwrite bytes inside the column data, leaving the footer intact."""
    data = bytearray(path.read_bytes())
    data[8:400] = bytes(range(256)) + bytes(136)
    path.write_bytes(bytes(data))


def _expect_error(run: Path, tmp_path: Path, match: str, capsys) -> str:
    out = tmp_path / "merged"
    err = scores_cli("merge", run, "-o", out, capsys=capsys, expect=2)
    assert match in err, err
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    return err


def test_truncated_part_is_named_before_any_work(synthetic, copy_of, tmp_path, capsys):
    run = copy_of(synthetic)
    part = sorted((run / "scores" / "dp00001").iterdir())[2]
    part.write_bytes(part.read_bytes()[:-100])
    err = _expect_error(run, tmp_path, str(part), capsys)
    assert "corrupt or truncated" in err
    report = scores_cli("verify", run, capsys=capsys, expect=1)
    assert not report["ok"] and str(part) in report["problems"][0]


def test_corrupt_column_data_is_named_while_reading(synthetic, copy_of, tmp_path, capsys):
    run = copy_of(synthetic)
    part = sorted((run / "scores" / "dp00000").iterdir())[3]
    _corrupt_pages(part)
    err = _expect_error(run, tmp_path, str(part), capsys)
    assert "unreadable" in err


def test_parts_of_another_run_or_schema_version_are_named(synthetic, copy_of, tmp_path, capsys):
    run = copy_of(synthetic)
    other = write_synthetic_dump(tmp_path / "other", SyntheticRun(steps=30, replicas=1, flush_every=5, seed=1))
    stranger = run / "scores" / "dp00000" / "part-s00000025-s00000029.parquet"
    shutil.copy(sorted((other / "scores" / "dp00000").iterdir())[-1], stranger)
    err = _expect_error(run, tmp_path, str(stranger), capsys)
    assert "two runs" in err

    stranger.unlink()
    newer = run / "steps" / "part-s00000025-s00000029.parquet"
    table = pq.read_table(sorted((run / "steps").iterdir())[0])
    newer_version = SCHEMA_VERSION + 1
    pq.write_table(table.replace_schema_metadata(part_metadata(ScoreDump.open(run).run_id, newer_version)), newer)
    err = _expect_error(run, tmp_path, str(newer), capsys)
    assert f"schema version {newer_version}" in err

    newer.unlink()
    source = sorted((run / "scores" / "dp00001").iterdir())[0]
    table = pq.read_table(source)
    renamed = source.with_name("part-s00000030-s00000031.parquet")
    pq.write_table(table.rename_columns(["step", "sample", *table.column_names[2:]]), renamed)
    err = _expect_error(run, tmp_path, str(renamed), capsys)
    assert "columns" in err


def test_empty_run_and_missing_manifest(tmp_path, capsys):
    write_manifest(tmp_path / "empty", manifest_for_tests())
    err = _expect_error(tmp_path / "empty", tmp_path, str(tmp_path / "empty" / "scores"), capsys)
    assert "empty run" in err
    err = _expect_error(tmp_path / "nothing", tmp_path, "no manifest", capsys)


def test_duplicate_rows_and_missing_steps_are_found(synthetic, copy_of, tmp_path, capsys):
    run = copy_of(synthetic)
    part = sorted((run / "scores" / "dp00000").iterdir())[0]
    twin = run / "scores" / "dp00009" / part.name
    twin.parent.mkdir()
    shutil.copy(part, twin)
    err = _expect_error(run, tmp_path, "duplicate", capsys)
    assert part.name in err and "verify" in err
    report = scores_cli("verify", run, capsys=capsys, expect=1)
    assert report["checked"]["duplicates"] == part_rows(part)
    assert any("dp00009: no rows for steps 5, 6" in p for p in report["problems"])

    shutil.rmtree(twin.parent)
    lost = sorted((run / "scores" / "dp00002").iterdir())[1]  # steps 5-9 of one replica
    lost.unlink()
    report = scores_cli("verify", run, capsys=capsys, expect=1)
    problems = "\n".join(report["problems"])
    assert "dp00002: no rows for steps 5, 6, 7, 8, 9" in problems
    assert "efficiency identity fails for target 'web' at steps 5, 6, 8, 9" in problems  # 7 is skipped


def part_rows(path: Path) -> int:
    return pq.read_metadata(path).num_rows


def test_overlapping_parts_in_one_replica_are_named(synthetic, copy_of, tmp_path, capsys):
    run = copy_of(synthetic)
    first = sorted((run / "scores" / "dp00000").iterdir())[0]
    overlap = first.with_name("part-s00000003-s00000004.parquet")
    shutil.copy(first, overlap)
    err = _expect_error(run, tmp_path, str(overlap), capsys)
    assert "overlap" in err


def test_existing_output_is_left_alone(synthetic, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    err = scores_cli("merge", synthetic, "-o", out, capsys=capsys, expect=2)
    assert "already exists" in err and (out / "mine.txt").read_text() == "keep me"
    with pytest.raises(DumpError, match="already exists"):
        merge(ScoreDump.open(synthetic), out)


def test_a_merged_directory_is_not_a_dump(synthetic, tmp_path, capsys):
    merge(ScoreDump.open(synthetic), tmp_path / "merged")
    report = scores_cli("verify", tmp_path / "merged", capsys=capsys, expect=1)
    assert "not an inrun_megatron.scores manifest (format 'inrun_megatron.values')" in report["problems"][0]
    (tmp_path / "merged" / "values" / "part-b00000.parquet").unlink()
    err = scores_cli("top", tmp_path / "merged", capsys=capsys, expect=2)
    assert "part-b00000.parquet: missing" in err


# ---------------------------------------------------------------------------------------------
# step-aware views (docs/DESIGN.md §1.6)

#: A hand-built dump: per step (lr, clip_coef, skipped, {replica: [(sample id, raw), ...]}).
HAND_STEPS = [
    (0.1, 1.0, False, {0: [(0, 1.0), (1, 3.0)], 1: [(2, -2.0), (3, 6.0)]}),
    (0.01, 0.5, False, {0: [(4, 4.0), (0, -4.0)], 1: [(5, 8.0), (1, 4.0)]}),  # samples 4 and 1 tie
    (0.1, 1.0, True, {0: [(2, 1.0), (3, 1.0)], 1: [(4, 1.0), (6, 1.0)]}),  # skipped: 6 is never trained
]


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory) -> Path:
    from inrun_megatron.step_result import make_step_result

    run = tmp_path_factory.mktemp("hand") / "run"
    write_manifest(run, manifest_for_tests(2, targets=[{"name": "val"}]))
    writers = [ScoreWriter(run, dp_rank=r, flush_every=2) for r in range(2)]
    for step, (lr, clip, skipped, replicas) in enumerate(HAND_STEPS):
        raws = [raw for rows in replicas.values() for _, raw in rows]
        for r, writer in enumerate(writers):
            ids, raw = zip(*replicas[r])
            writer.write(
                make_step_result(
                    step=step,
                    raw=torch.tensor(raw, dtype=torch.float64).reshape(1, 1, -1),
                    sample_ids=torch.tensor(ids).reshape(1, -1),
                    n_tokens=torch.full((1, len(ids)), 10),
                    lr=lr,
                    clip_coef=clip,
                    skipped=skipped,
                    dp_rank=r,
                    validation_losses={"val": 1.0},
                    batch_dots={"val": sum(raws)},
                )
            )
    for writer in writers:
        writer.close()
    return run


def hand_views() -> dict[str, dict[int, float]]:
    """Every view of HAND_STEPS from the definitions, in plain Python."""
    import statistics

    per_sample: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for lr, clip, skipped, replicas in HAND_STEPS:
        rows = [(sid, lr * clip * raw) for rows in replicas.values() for sid, raw in rows]
        if skipped:
            for sid, _ in rows:
                per_sample["accumulated"][sid].append(0.0)
                for view in ("step-scaled", "step-z", "step-rank"):
                    per_sample[view].setdefault(sid, [])
            continue
        values = [v for _, v in rows]
        mean, std = statistics.fmean(values), statistics.pstdev(values)
        mean_abs = statistics.fmean(abs(v) for v in values)
        for sid, v in rows:
            below, equal = sum(x < v for x in values), sum(x == v for x in values)
            per_sample["accumulated"][sid].append(v)
            per_sample["step-scaled"][sid].append(v / mean_abs)
            per_sample["step-z"][sid].append((v - mean) / std)
            per_sample["step-rank"][sid].append((below + (equal + 1) / 2 - 0.5) / len(values))
    neutral = {"step-scaled": 0.0, "step-z": 0.0, "step-rank": 0.5}
    views = {"accumulated": {sid: sum(v) for sid, v in per_sample["accumulated"].items()}}
    for view, n in neutral.items():
        views[view] = {sid: statistics.fmean(v) if v else n for sid, v in per_sample[view].items()}
    return views


def test_each_view_follows_its_definition_on_a_hand_built_dump(hand_run, capsys):
    expected = hand_views()
    # sample 1: rank 3 of 4 at step 0, and at step 1 tied with sample 4 for ranks 2 and 3 (midrank 2.5)
    assert expected["step-rank"][1] == pytest.approx(((3 - 0.5) / 4 + (2.5 - 0.5) / 4) / 2)
    assert expected["step-z"][6] == 0.0 and expected["accumulated"][6] == 0.0  # only in the skipped step
    for view, values in expected.items():
        answer = scores_cli("top", hand_run, "--view", view, "-k", 10, capsys=capsys)
        assert answer["view"]["name"] == view
        got = {row["sample_id"]: row["value"] for row in answer["samples"]}
        assert got.keys() == values.keys()
        assert all(got[s] == pytest.approx(values[s], rel=1e-12, abs=1e-15) for s in values), (view, got, values)
        assert [row["sample_id"] for row in answer["samples"]] == sorted(values, key=lambda s: (-values[s], s))


def test_every_command_takes_a_view(synthetic, tmp_path, capsys):
    """top, curate and compare accept --view (by-source, which needs a data section, in the megatron test)."""
    views = direct_views(synthetic, "web")
    top = scores_cli("top", synthetic, "--target", "web", "--view", "step-z", "-k", 5, "--bottom", capsys=capsys)
    lowest = sorted(views["step-z"], key=lambda s: (views["step-z"][s], s))[:5]
    assert [row["sample_id"] for row in top["samples"]] == lowest

    keep = tmp_path / "keep.txt"
    answer = scores_cli(
        "curate",
        synthetic,
        "-o",
        keep,
        "--target",
        "web",
        "--view",
        "step-rank",
        "--drop-fraction",
        0.25,
        capsys=capsys,
    )
    ranks = views["step-rank"]
    lowest = sorted(ranks, key=lambda s: (ranks[s], s))[: round(0.25 * len(ranks))]
    assert {int(x) for x in keep.read_text().split()} == set(ranks) - set(lowest)
    assert answer["view"]["name"] == "step-rank" and answer["dropped"] == len(lowest)

    same = scores_cli(
        "compare", synthetic, "--target", "web", "--target-b", "code", "--view", "step-rank", capsys=capsys
    )
    raw = scores_cli("compare", synthetic, "--target", "web", "--target-b", "code", capsys=capsys)
    assert same["view"]["name"] == "step-rank" and same["spearman"] != raw["spearman"]
    from scipy import stats

    with Scores(synthetic) as scores:  # the view's values (checked against numpy below), ranked by scipy
        web, code = (
            pa.Table.from_batches(scores.view("step-rank", t).batches(t, ["sample_id", "value"])).sort_by("sample_id")
            for t in ("web", "code")
        )
    rho = stats.spearmanr(web["value"].to_numpy(), code["value"].to_numpy()).statistic
    assert same["spearman"] == pytest.approx(rho, rel=1e-12)


def direct_views(run: Path, target: str) -> dict[str, dict[int, float]]:
    """The step views straight from a dump's rows with numpy and scipy, one step at a time."""
    from scipy import stats

    table = ds.dataset(run / "scores", format="parquet").to_table()
    table = table.filter(pa.compute.equal(table["target"], target))
    sid, step = table["sample_id"].to_numpy(), table["step"].to_numpy()
    value, skipped = table["value"].to_numpy(), table["skipped"].to_numpy(zero_copy_only=False)
    per_row = {view: np.zeros(len(sid)) for view in ("step-scaled", "step-z", "step-rank")}
    for t in np.unique(step[~skipped]):
        mine = (step == t) & ~skipped
        v = value[mine]
        per_row["step-scaled"][mine] = v / np.abs(v).mean()
        per_row["step-z"][mine] = (v - v.mean()) / v.std()
        per_row["step-rank"][mine] = (stats.rankdata(v) - 0.5) / len(v)
    samples = np.unique(sid)
    trained = np.array([(~skipped[sid == s]).sum() for s in samples])
    views = {}
    for view, x in per_row.items():
        sums = np.array([x[(sid == s) & ~skipped].sum() for s in samples])
        neutral = 0.5 if view == "step-rank" else 0.0
        views[view] = dict(zip(samples.tolist(), np.where(trained > 0, sums / np.maximum(trained, 1), neutral)))
    return views


def test_views_out_of_core_equal_numpy_at_scale(tmp_path):
    """Many replicas, parts and epochs, a skipped step, and a memory budget that makes 26 buckets: the
    out-of-core views of a dump, of a merge with per-step rows and of one without equal numpy's."""
    from inrun_megatron.analysis.merge import BASE_BYTES, REDUCE_BYTES_PER_ROW, buckets_for

    shape = SyntheticRun(steps=120, replicas=4, micro_batches=4, micro_batch_size=16, epochs=3, skipped_steps=(40,))
    run = write_synthetic_dump(tmp_path / "run", shape)
    memory = BASE_BYTES + 2000 * REDUCE_BYTES_PER_ROW
    assert buckets_for(shape.rows, memory) == 16
    expected = direct_views(run, "validation")
    merge(ScoreDump.open(run), tmp_path / "per_step", per_step=True, buckets=5)
    merge(ScoreDump.open(run), tmp_path / "plain", buckets=3)
    for where in (run, tmp_path / "per_step", tmp_path / "plain"):
        with Scores(where, memory_bytes=memory) as scores:
            for view, values in expected.items():
                table = pa.Table.from_batches(scores.view(view).batches("validation", ["sample_id", "value"]))
                got = dict(zip(table["sample_id"].to_pylist(), table["value"].to_pylist()))
                assert got.keys() == values.keys() and len(got) == shape.samples
                assert all(got[s] == pytest.approx(values[s], rel=1e-12, abs=1e-14) for s in values), (where, view)


@pytest.mark.parametrize("command", ["top", "by-source", "curate", "compare"])
def test_an_unknown_view_is_refused_before_any_work(synthetic, tmp_path, command, capsys):
    extra = ["-o", tmp_path / "keep.txt", "--drop-fraction", 0.1] if command == "curate" else []
    with pytest.raises(SystemExit) as exited:
        cli.main([command, str(synthetic), "--view", "raw-ish", *map(str, extra)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "invalid choice: 'raw-ish'" in err and "step-rank" in err
    assert not (tmp_path / "keep.txt").exists()
    from inrun_megatron.analysis import commands

    (tmp_path / "work").mkdir()
    with Scores(synthetic, work_dir=tmp_path / "work") as scores:
        with pytest.raises(ValueError, match="unknown view 'raw-ish'; the views are accumulated, step-scaled"):
            commands.top(scores, view="raw-ish")
        assert not list((tmp_path / "work").iterdir())  # nothing merged


def test_drop_negative_needs_a_signed_view(synthetic, tmp_path, capsys):
    err = scores_cli(
        "curate", synthetic, "-o", tmp_path / "k.txt", "--view", "step-z", "--drop-negative", capsys=capsys, expect=2
    )
    assert "--drop-negative needs a view whose sign means helped or hurt (accumulated, step-scaled)" in err


def test_curate_by_document_refuses_a_run_without_document_values_before_any_work(synthetic, tmp_path, capsys):
    (tmp_path / "work").mkdir()
    args = ["curate", synthetic, "-o", tmp_path / "k.jsonl", "--drop-negative", "--by-document"]
    err = scores_cli(*args, "--work-dir", tmp_path / "work", capsys=capsys, expect=2)
    assert "curate --by-document needs document values and the run recorded none" in err
    assert "scoring.document_values" in err
    assert not (tmp_path / "k.jsonl").exists() and not list((tmp_path / "work").iterdir())  # nothing merged


def test_a_step_that_tells_no_sample_apart_gives_the_neutral_value():
    """A step with lr 0 (all values 0) and a step of equal values, next to an ordinary step."""
    from inrun_megatron.analysis.views import VIEWS, per_step_view

    step = np.array([0, 0, 0, 1, 1, 2, 2])
    value = np.array([0.0, 0.0, 0.0, 2.0, 2.0, -1.0, 3.0])
    skipped = np.zeros(7, dtype=bool)
    assert per_step_view("step-z", step, value, skipped).tolist() == [0, 0, 0, 0, 0, -1, 1]
    assert per_step_view("step-scaled", step, value, skipped).tolist() == [0, 0, 0, 1, 1, -0.5, 1.5]
    assert per_step_view("step-rank", step, value, skipped).tolist() == [0.5] * 5 + [0.25, 0.75]
    assert [VIEWS[v].neutral for v in ("step-z", "step-scaled", "step-rank")] == [0.0, 0.0, 0.5]
