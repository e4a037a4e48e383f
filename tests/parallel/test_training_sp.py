"""`torchrun --nproc_per_node 4 -m lctrain recipes/tiny.yaml parallel.sp=4` gives the losses of one process."""
import pytest

from tests.train.conftest import run_lctrain, train_losses

SP_MODEL = ["model.n_heads=4", "model.n_kv_heads=4", "model.pattern=GGGA", "model.n_layers=4", "train.steps=3",
            "checkpoint.interval=0", "train.eval_batches=0"]

# Slow (all six combinations). By default the trainer's SP path runs once, in the dp 2 x sp 2 test below (ring
# attention, zigzag layout); every op is checked against one process at sp 2 and 4 in test_attention.py.
COMBOS = [(attn, layout) for attn in ("allgather", "ring", "ulysses") for layout in ("contiguous", "zigzag")]


@pytest.fixture(scope="module")
def single_process_losses(cache_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("sp1")
    run_lctrain(cache_dir, run, *SP_MODEL)
    return train_losses(run)


@pytest.mark.slow
@pytest.mark.parametrize("attn,layout", COMBOS)
def test_sp4_training_matches_single_process(cache_dir, tmp_path, single_process_losses, attn, layout):
    run = tmp_path / "run"
    run_lctrain(cache_dir, run, *SP_MODEL, "parallel.sp=4", f"parallel.attn={attn}", f"parallel.layout={layout}",
                nproc=4)
    losses = train_losses(run)
    assert sorted(losses) == sorted(single_process_losses) == [1, 2, 3]
    for step, loss in single_process_losses.items():
        assert losses[step] == pytest.approx(loss, rel=2e-6, abs=1e-6), step


def test_dp2_sp2_training_matches_single_process(cache_dir, tmp_path):
    """dp 2 x sp 2 sees the same global batch as one process with twice the micro-batch."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_lctrain(cache_dir, ref, *SP_MODEL, "train.micro_batch_size=8")
    run_lctrain(cache_dir, run, *SP_MODEL, "parallel.sp=2", "parallel.attn=ring", "parallel.layout=zigzag", nproc=4)
    a, b = train_losses(ref), train_losses(run)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-6, abs=1e-6), step
