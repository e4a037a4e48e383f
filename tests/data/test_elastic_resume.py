"""A ddp checkpoint continues on another number of processes: the loader's position is global."""
import pytest

from tests.train.conftest import run_lctrain, train_losses

# 512 tokens per step whatever the world size: 1 process accumulates 2 micro-batches of 4 x 64, 2 processes take
# one each; the step sees the same 8 windows either way.
STEPS = ["train.steps=4", "train.tokens_per_step=512", "data.max_documents=12", "train.schedule=constant",
         "train.warmup_steps=0", "checkpoint.interval=2"]


@pytest.mark.parametrize("before, after", [(1, 2), pytest.param(2, 1, marks=pytest.mark.slow)])
def test_resume_on_another_world_size_continues_the_same_run(cache_dir, tmp_path, before, after):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_lctrain(cache_dir, straight, *STEPS, nproc=1)
    run_lctrain(cache_dir, split, *STEPS, "train.stop_at=2", nproc=before)
    proc = run_lctrain(cache_dir, split, *STEPS, nproc=after)
    assert f"(written by {before} processes) on {after}" in proc.stdout
    a, b = train_losses(straight), train_losses(split)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):  # same windows, same weights: equal up to the order of float reductions
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), (step, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)])
def test_streaming_resume_on_another_world_size_continues_the_same_run(cache_dir, tmp_path, engine, before, after):
    """Streaming: the run's virtual ranks (fixed by its first world size) continue on another number of processes,
    each reading the streams of the windows it takes; the steps see the same windows as the uninterrupted run.
    From 2 processes to 1, the one rank goes on with the streams rank 1 saved. Under fsdp DCP reshards the
    weights and AdamW state, and the ranks get every rank's stream states as under ddp."""
    import json
    import random

    from tests.data.textgen import random_text

    rng = random.Random(5)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(4):
        rows = [json.dumps({"text": random_text(rng, rng.randint(20, 120))}) for _ in range(20)]
        (corpus / f"p{k}.jsonl").write_text("\n".join(rows) + "\n")
    steps = [*STEPS, f"data.sources=[{{type: jsonl, path: {corpus}}}]", "data.streaming=true",
             "data.num_workers=1", "data.max_documents=0", f"train.engine={engine}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_lctrain(cache_dir, straight, *steps, nproc=before)
    run_lctrain(cache_dir, split, *steps, "train.stop_at=2", nproc=before)
    proc = run_lctrain(cache_dir, split, *steps, nproc=after)
    assert f"(written by {before} processes) on {after}" in proc.stdout
    a, b = train_losses(straight), train_losses(split)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), (step, a, b)
