"""The pretraining entry point end to end (torchrun, gloo, several processes): a scored run's dumps,
manifest and sample map; SIGKILLs at random points and resumes that end with exactly the values
of the uninterrupted run; bad inputs that stop every rank before training starts."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from common import verified_efficiency
from launcher import TESTS
from pretrain_common import accumulate_from_rows, prepare_data, read_rows, run_pretrain, srun_like, tiny_config

pytestmark = [pytest.mark.megatron, pytest.mark.slow]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("pretrain"))


def _ok(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return proc.stdout


def _check_dump_consistency(run_dir, steps: int, global_batch: int, targets: list[str]) -> None:
    """Every sample of every step appears exactly once per target, and (the runs train with Adam)
    once more in the target's Adam-aware rows from the second step on; the accumulated values merged
    at the end of the run (merged/) equal the dump's rows summed in step order, bit for bit."""
    rows = read_rows(run_dir)
    assert rows.num_rows == (2 * steps - 1) * global_batch * len(targets)
    for target in targets:
        for row, first in ((target, 0), (f"{target}:adam", global_batch)):
            ids = np.sort(rows.filter(ds.field("target") == row)["sample_id"].to_numpy())
            np.testing.assert_array_equal(ids, np.arange(first, steps * global_batch))
    values = read_rows(run_dir, "values")
    carried = dict(zip(zip(values["target"].to_pylist(), values["sample_id"].to_pylist()), values["value"].to_pylist()))
    assert carried == accumulate_from_rows(rows)


def test_scored_run_end_to_end(data_dir, tmp_path):
    """TP=2 x PP=2 in bf16 with a locally trained BPE, a held-out and a JSONL target, TensorBoard on;
    micro-batch size 1, so ``scoring.path: auto`` scores on the microbatch-gradient path."""
    from inrun_megatron.data import open_sample_index, train_bpe
    from inrun_megatron.data.indexed import preprocess, read_documents

    corpus = data_dir.parent / "corpus.jsonl"
    bpe = train_bpe((d.text for d in read_documents(corpus)), 320, tmp_path / "bpe" / "tokenizer.json")
    preprocess([corpus], tmp_path / "bpe", bpe)
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("beta mu", "alpha kappa")))
    config = tiny_config(
        tmp_path / "bpe",
        tmp_path / "run",
        model={"precision": "bf16"},
        parallel={"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
        training={"train_iters": 6, "global_batch_size": 8, "micro_batch_size": 1},
        logging={"log_interval": 2, "tensorboard": True},
        checkpoint={"save_interval": None},
    )
    config["data"]["tokenizer"] = {"type": "json", "path": str(tmp_path / "bpe" / "tokenizer.json")}
    config["validation"]["targets"].append({"name": "mine", "jsonl": str(tmp_path / "mine.jsonl")})
    out = _ok(run_pretrain(config, 4))
    run = tmp_path / "run"

    assert "scoring on (microbatch path): heldout-a, mine" in out
    progress = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(progress) == 3 and "val heldout-a" in progress[-1] and "mine" in progress[-1]
    assert "rows 176" in progress[-1]  # (6 SGD + 5 Adam-aware) x 8 sequences x 2 targets, all flushed
    manifest = json.loads((run / "manifest.json").read_text())
    assert "positive = the sample lowered the validation loss" in manifest["contract"]["sign"]
    assert manifest["layout"]["pipeline_parallel"] == 2 and manifest["entry_point"] == "launch/pretrain_gpt.py"
    assert manifest["versions"]["megatron_core"] and manifest["config"]["training"]["train_iters"] == 6
    assert [t["name"] for t in manifest["targets"]] == ["heldout-a", "mine"]
    assert manifest["targets"][1]["sequences"] == 2 and manifest["scoring_path"] == "microbatch"
    assert manifest["loss_normalisation"] == "microbatch_tokens"  # megatron's default loss
    # trained with Adam: both values are recorded and the analysis reads the Adam-aware one by default
    assert manifest["values"]["default"] == "adam"
    assert manifest["values"]["rows"]["mine:adam"] == {"target": "mine", "value": "adam"}
    _check_dump_consistency(run, 6, 8, ["heldout-a", "mine"])
    steps = read_rows(run, "steps")
    assert steps.num_rows == 22 and all(v > 0 for v in steps["validation_loss"].to_pylist())
    rows = read_rows(run)
    assert np.isfinite(rows["raw"].to_numpy()).all() and (rows["n_tokens"].to_numpy() == 32).all()

    index = open_sample_index(run)  # the run directory alone maps ids back to text
    table = index.lookup(np.arange(48))
    assert set(table["source"].to_pylist()) == {"a", "b", "c"}
    assert index.tokenizer.fingerprint == bpe.fingerprint and index.tokenizer.path.parent == run
    assert index.text(5, max_chars=10_000) == bpe.detokenize(index.token_ids(5))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "validation/mine/loss", "scores/heldout-a/sum", "scores/mine/positive_fraction"} <= set(tags)
    sums = [e.value for e in events.Scalars("scores/heldout-a/sum")]
    per_step = rows.filter(ds.field("target") == "heldout-a")
    expected = [
        float(np.sum(per_step.filter(ds.field("step") == s)["value"].to_numpy(), dtype=np.float64)) for s in range(6)
    ]
    np.testing.assert_allclose(sums, expected, rtol=1e-5)  # TensorBoard stores float32


def _kill_plan(rng: random.Random, steps: int, save_every: int) -> list[str]:
    """Three kills at random points, each after the previous one's resume point: during a step
    (after rows of steps past the last checkpoint were flushed), halfway through a flush, and
    between writing a checkpoint and committing it."""
    step_kill = rng.randrange(save_every + 2, 2 * save_every)  # resumes from the first checkpoint
    resume = save_every
    flush_kill = rng.randrange(resume + 1, steps - save_every, 2)  # flush_every=2: parts end on odd steps
    resume = flush_kill // save_every * save_every  # the checkpoint after that step is not written yet
    checkpoint_kill = rng.choice(range(resume + save_every, steps + 1, save_every))
    return [f"step:{step_kill}", f"flush:{flush_kill}", f"checkpoint:{checkpoint_kill}"]


def test_killed_runs_resume_to_the_same_values(data_dir, tmp_path):
    """TP=2 x DP=2 with the distributed optimizer and megatron's per-token loss
    (``training.calculate_per_token_loss``, docs/DESIGN.md §1.1): the run and its resumes record a
    dump ``inrun-scores verify`` accepts, whose manifest names the loss normalisation."""
    seed = int(os.environ.get("INRUN_FAULT_SEED", "2026"))
    steps, save_every = 24, 8
    sections = dict(
        parallel={"use_distributed_optimizer": True},  # its state is sharded over DP in the checkpoint
        training={"train_iters": steps, "calculate_per_token_loss": True},
        scoring={"flush_every": 2},
        checkpoint={"save_interval": save_every},
    )
    _ok(run_pretrain(tiny_config(data_dir, tmp_path / "reference", **sections), 4))
    config = tiny_config(data_dir, tmp_path / "faulty", **sections)
    run = tmp_path / "faulty"
    plan = _kill_plan(random.Random(seed), steps, save_every)
    where = f"kill plan {plan} (INRUN_FAULT_SEED={seed})"
    for kill in plan:
        proc = run_pretrain(config, 4, kill=kill)
        point, _, at = kill.partition(":")
        assert proc.returncode != 0 and f"KILLED {point} {at}" in proc.stdout, f"{where}: {proc.stderr[-3000:]}"
        latest = int((run / "checkpoints" / "latest").read_text())
        parts = [p for p in (run / "scores").rglob("part-*.parquet")]
        if point == "step":  # rows of steps after the checkpoint were on disk when it died
            assert max(int(p.name.split("-s")[2][:8]) for p in parts) >= latest, where
        if point == "flush":  # a torn part is left; readers skip it
            torn = list((run / "scores").rglob(".part-*.parquet.tmp"))
            assert torn, where
            with pytest.raises(Exception, match=r"(?i)parquet"):
                pq.read_table(torn[0])
            assert ds.dataset(run / "scores", format="parquet").to_table().num_rows > 0
        if point == "checkpoint":  # written but never committed: latest still names the previous one
            assert latest < int(at) and (run / "checkpoints" / f"iter_{int(at):07d}").is_dir(), where
    out = _ok(run_pretrain(config, 4))
    assert "resumed at step" in out

    _check_dump_consistency(run, steps, 8, ["heldout-a"])
    for directory in (run, tmp_path / "reference"):  # <g, G> recorded on every step, resumed ones included
        verified_efficiency(directory, steps=steps)
    for stream in ("scores", "steps", "values"):
        ours, reference = read_rows(run, stream).to_pylist(), read_rows(tmp_path / "reference", stream).to_pylist()
        assert len(ours) == len(reference), f"{where}: {stream}"
        for a, b in zip(ours, reference):
            same = {k: a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) for k in a}
            assert all(same.values()), f"{where}: {stream} row {a} != {b}"
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["resumed_from"]) == 3, manifest["resumed_from"]
    assert manifest["loss_normalisation"] == "global_batch_tokens"


def test_bad_inputs_stop_every_rank_before_training(data_dir, tmp_path):
    """Started the way srun starts tasks; every case stops both ranks with one message."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "alpha " * 40}) + "\n")
    run = tmp_path / "run"
    config = tiny_config(data_dir, run, parallel={"tensor_model_parallel_size": 1})
    config_path = tmp_path / "bad.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cases = {
        "missing data": ([f"data.sources.1.prefix={data_dir / 'nope'}"], f"{data_dir / 'nope'}.bin does not exist"),
        "validation too long": (
            [f"validation.targets=[{{name: long, jsonl: {tmp_path / 'long.jsonl'}}}]"],
            "long.jsonl:1 has 240 tokens (plus the end-of-document token) but the sequence length is 32",
        ),
        "unwritable output": (
            [f"output.run_dir={blocker / 'run'}"],
            f"output.run_dir {blocker / 'run'} is not writable",
        ),
        "held-out too small": (["validation.targets.0.sequences=100000"], "its held-out split holds"),
        "other tokenizer": (
            [f"data.tokenizer={{type: json, path: {tmp_path / 'none.json'}}}"],
            f"tokenizer file {tmp_path / 'none.json'} does not exist",
        ),
    }
    worker = TESTS / "workers" / "pretrain_bad_inputs.py"
    procs = srun_like(worker, 2, str(tmp_path), str(config_path), json.dumps([o for o, _ in cases.values()]))
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-4000:] + procs[1].stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for i, (name, (_, message)) in enumerate(cases.items()):
        assert [r[i]["code"] for r in ranks] == [2, 2], name
        assert message in ranks[0][i]["stderr"], f"{name}: {ranks[0][i]['stderr']}"
        assert message not in ranks[1][i]["stderr"], name  # printed once, by rank 0
    assert not (run / "scores").exists() and not (run / "checkpoints").exists()


def test_document_values_end_to_end(data_dir, tmp_path, capsys):
    """``scoring.document_values`` at TP=2 with sequence parallelism, micro-batch size 1 (so ``auto`` takes the
    rules): every sequence's document rows sum to its row, every span is its document in the sample map, and
    ``inrun-scores by-document`` sums each document's rows over its sequences and steps (docs/DESIGN.md §2.9)."""
    from inrun_megatron.data import open_sample_index

    config = tiny_config(
        data_dir,
        tmp_path / "run",
        model={"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64},
        parallel={"tensor_model_parallel_size": 2, "sequence_parallel": True},
        training={"train_iters": 3, "global_batch_size": 4, "micro_batch_size": 1, "seed": 7},
        scoring={"flush_every": 2, "document_values": True},
        checkpoint={"save_interval": None},
    )
    _ok(run_pretrain(config, 2))
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["scoring"]["document_eod"] == 256 and manifest["scoring_path"] == "rules"
    assert "span" in manifest["columns"]["documents"]

    rows = read_rows(run).to_pylist()
    documents = ds.dataset(run / "documents", format="parquet").to_table().to_pylist()
    assert {(r["step"], r["target"], r["sample_id"]) for r in rows} == {
        (d["step"], d["target"], d["sample_id"]) for d in documents
    }
    spans: dict[tuple, list] = {}
    for d in documents:
        spans.setdefault((d["step"], d["target"], d["sample_id"]), []).append(d)
    for r in rows:
        mine = sorted(spans[r["step"], r["target"], r["sample_id"]], key=lambda d: d["span"])
        assert [d["span"] for d in mine] == list(range(len(mine)))
        assert math.fsum(d["raw"] for d in mine) == pytest.approx(r["raw"], rel=1e-12, abs=1e-300)
        assert sum(d["span_tokens"] for d in mine) == 64
    assert max(d["span"] for d in documents) >= 1, "the data must pack several documents per sequence"

    index = open_sample_index(run)  # span k of a sample is its k-th document, less the final label token
    expected: dict[tuple[str, int], float] = {}
    for d in documents:
        if d["target"] != "heldout-a:adam":
            continue
        row = index.lookup(np.array([d["sample_id"]])).to_pylist()[0]
        inputs = row["document_tokens"][: d["span"] + 1]
        last = d["span"] == len(row["document_tokens"]) - 1
        assert d["span_tokens"] == inputs[-1] - last
        key = (row["source"], row["document_ids"][d["span"]])
        expected[key] = expected.get(key, 0.0) + d["value"]
    answer = scores_cli("by-document", run, "-k", 0, capsys=capsys)
    assert answer["target"] == "heldout-a:adam"  # trained with Adam: the Adam-aware value by default
    got = {(d["source"], d["document_id"]): d["value"] for d in answer["documents"]}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    sources = {s["source"]: s["sum"] for s in answer["sources"]}
    for name, total in sources.items():
        assert total == pytest.approx(sum(v for (s, _), v in expected.items() if s == name), rel=1e-12, abs=1e-15)
    ranked = scores_cli("by-document", run, "-k", 3, "--view", "step-rank", "--value", "sgd", capsys=capsys)
    assert ranked["target"] == "heldout-a" and len(ranked["documents"]) == 3
    assert all(0 < d["value"] < 1 for d in ranked["documents"])

    # A span whose length is not its document's (an EOD the map does not know) stops by-document.
    from inrun_megatron.analysis import cli

    part = sorted((run / "documents" / "dp00000").glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    adam = np.asarray(table.column("target").to_pylist()) == "heldout-a:adam"  # what by-document reads
    sample_id = table.column("sample_id").to_numpy()
    first = (sample_id == sample_id[adam][0]) & (table.column("span").to_numpy() == 0)
    tokens = table.column("span_tokens").to_numpy() + first
    pq.write_table(table.set_column(table.schema.get_field_index("span_tokens"), "span_tokens", pa.array(tokens)), part)
    capsys.readouterr()
    assert cli.main(["by-document", str(run), "--json", "--quiet"]) == 2
    assert "the sample map gives" in capsys.readouterr().err


def test_second_order_values_end_to_end(data_dir, tmp_path, capsys):
    """``scoring.second_order`` (docs/DESIGN.md §1.7) at TP=2 with sequence parallelism, trained with Adam: every
    step's dump holds each sample's curvature and second-order rows, ``inrun-scores verify`` checks their efficiency
    identities (the curvatures sum to ``<g_t, H_val g_t>``), each second-order value is the sample's SGD value plus
    its curvature term, and ``inrun-scores top --value second-order`` reads their sums."""
    steps, batch = 3, 4
    config = tiny_config(
        data_dir,
        tmp_path / "run",
        parallel={"tensor_model_parallel_size": 2, "sequence_parallel": True},
        training={"train_iters": steps, "global_batch_size": batch, "micro_batch_size": 2},
        optimizer={"lr_warmup_iters": 0},  # a learning rate above 0 from the first step: curvature terms are not 0
        scoring={"flush_every": 2, "second_order": True},
        checkpoint={"save_interval": None},
    )
    _ok(run_pretrain(config, 2))
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["scoring"]["second_order"] is True
    assert manifest["values"]["rows"]["heldout-a:curvature"] == {"target": "heldout-a", "value": "curvature"}
    assert manifest["values"]["rows"]["heldout-a:second-order"] == {"target": "heldout-a", "value": "second-order"}
    checked = verified_efficiency(run, steps=steps)
    assert sorted(checked) == ["heldout-a", "heldout-a:adam", "heldout-a:curvature", "heldout-a:second-order"]

    rows = {(r["step"], r["target"], r["sample_id"]): r for r in read_rows(run).to_pylist()}
    second_order = {key: r for key, r in rows.items() if key[1] == "heldout-a:second-order"}
    assert sorted(second_order) == [
        (s, "heldout-a:second-order", i) for s in range(steps) for i in range(s * batch, (s + 1) * batch)
    ]
    expected: dict[int, float] = {}
    for (step, _, sample_id), row in second_order.items():
        first, term = rows[step, "heldout-a", sample_id], rows[step, "heldout-a:curvature", sample_id]
        assert math.isfinite(term["raw"]) and term["value"] != 0.0
        assert row["value"] == pytest.approx(first["value"] + term["value"], rel=1e-6, abs=1e-12)
        expected[sample_id] = expected.get(sample_id, 0.0) + row["value"]
    answer = scores_cli("top", run, "--value", "second-order", "-k", len(expected), capsys=capsys)
    assert answer["target"] == "heldout-a:second-order"
    assert {s["sample_id"]: s["value"] for s in answer["samples"]} == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert scores_cli("top", run, "-k", 1, capsys=capsys)["target"] == "heldout-a:adam"  # the default stays Adam's


def test_batches_carry_the_reset_attention_mask_over_tensor_parallelism(tmp_path):
    """``data.reset_attention_mask``: the batch reader broadcasts megatron's mask from tensor-parallel rank 0
    with the rest of the batch, as a bool mask; a batch without one (a jsonl validation target) stays without."""
    from launcher import launch

    for rank, result in enumerate(launch("tp_batch_broadcast.py", 2, tmp_path)):
        masked, plain = result["got"]
        sent_masked, sent_plain = result["sent"]
        assert sorted(masked) == sorted(sent_masked) and sorted(plain) == sorted(sent_plain), rank
        for got, sent in ((masked, sent_masked), (plain, sent_plain)):
            for key, value in sent.items():
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), (rank, key)
        assert not masked["attention_mask"].all(-1).any() and masked["attention_mask"].any()  # a cut, not causal


def scores_cli(*args, capsys) -> dict:
    """``inrun-scores ARGS --json`` in this process; its answer."""
    from inrun_megatron.analysis import cli

    capsys.readouterr()
    assert cli.main([*map(str, args), "--json", "--quiet"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)
