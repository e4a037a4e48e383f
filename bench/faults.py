"""Fault matrix: what a cluster does to a run, and what lctrain does next.

    python bench/faults.py                 # every fault, CPU, a tiny model (about 5 minutes on 2 busy cores)
    python bench/faults.py --only kill9,corrupt_newest

Each row breaks a real run the way a week-long job meets it, runs the same command again and compares with an
uninterrupted run of the same recipe: fault, expected, observed (exit code and the line the run printed),
whether the resumed losses equal the uninterrupted ones step by step (exact float equality), and the seconds the
faulty command took. Disk full uses a small tmpfs (needs root; the row says `skipped` otherwise). The frozen
rank runs 2 gloo processes under torchrun with parallel.timeout_s=5.

Writes bench/results/faults_cpu.json and faults_cpu.png and prints the table (Markdown) for docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SMALL = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=128", "model.pattern=GA",
    "data.seq_len=64", "data.vocab_size=512", "data.tokenizer_sample_chars=150000", "data.max_documents=40",
    "train.micro_batch_size=4", "train.log_interval=1", "train.eval_interval=0", "train.eval_batches=2",
    "train.warmup_steps=2", "logging.progress=plain", "logging.tensorboard=false",
]
STEPS = 10
RECIPE = [f"train.steps={STEPS}", "checkpoint.interval=2", "checkpoint.keep_last=3"]


def env(cache: Path) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    out.update(LCTRAIN_CACHE=str(cache), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(run: Path, *overrides, nproc: int = 1) -> list[str]:
    args = ["recipes/tiny.yaml", f"run.dir={run}", *SMALL, *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "lctrain", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "lctrain", *args]


class Bench:
    def __init__(self, work: Path):
        self.work, self.cache = work, work / "cache"
        self.reference: dict[int, dict[int, float]] = {}

    def run(self, run: Path, *overrides, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(command(run, *overrides, nproc=nproc), cwd=ROOT, env=env(self.cache),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, run: Path, *overrides, nproc: int = 1) -> subprocess.Popen:
        return subprocess.Popen(command(run, *overrides, nproc=nproc), cwd=ROOT, env=env(self.cache),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def losses(self, run: Path) -> dict[int, float]:
        path = run / "metrics.jsonl"
        if not path.is_file():
            return {}
        out, steps = {}, []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "loss" in record:
                out[record["step"]] = record["loss"]
                steps.append(record["step"])
        if len(steps) != len(set(steps)):
            return {-1: float("nan")}  # a step logged twice: a silent restart
        return out

    def identical(self, run: Path, nproc: int = 1) -> str:
        if nproc not in self.reference:
            straight = self.work / f"straight-{nproc}"
            proc = self.run(straight, *RECIPE, nproc=nproc)
            if proc.returncode:
                raise RuntimeError(f"the uninterrupted run failed: {proc.stderr[-2000:]}")
            self.reference[nproc] = self.losses(straight)
        return "yes" if self.losses(run) == self.reference[nproc] else "no"

    def fresh(self, name: str) -> Path:
        run = self.work / name
        shutil.rmtree(run, ignore_errors=True)
        return run


def said(proc, *marks: str) -> str:
    """The first line of the run's output holding one of `marks` (what the user reads)."""
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        if any(m in line for m in marks):
            return line.strip()[:220]
    return ""


def wait_for_step(run: Path, step: int, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"run ended early: {proc.communicate()[1][-2000:]}")
        path = run / "metrics.jsonl"
        if path.is_file():
            steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if x.endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise RuntimeError("timed out waiting for a step")


def worker_pid(parent: int, rank: int) -> int:
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            stat = (child / "stat").read_text().split()
            environ = (child / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[3]) == parent and f"RANK={rank}".encode() in environ:
            return int(child.name)
    raise RuntimeError(f"no rank {rank} under {parent}")


# ----------------------------------------------------------------------------------------------- the faults
def kill9(b: Bench) -> dict:
    run = b.fresh("kill9")
    rng = random.Random(0)
    kills = mid_save = 0
    for _ in range(4):
        done = max(b.losses(run), default=0)
        proc = b.start(run, *RECIPE, "checkpoint.interval=1")
        try:
            wait_for_step(run, done + 1, proc)
            time.sleep(rng.uniform(0.0, 0.6))  # saves take a large share of a step here: kills land mid-save
        except RuntimeError:
            break  # finished before the kill
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_save += bool(list((run / "checkpoints").glob(".tmp-*")))  # a partial save was left behind
    t0 = time.time()
    final = b.run(run, *RECIPE, "checkpoint.interval=1")
    leftovers = list((run / "checkpoints").glob(".tmp-*"))
    return dict(fault=f"kill -9 at random moments ({kills}x, {mid_save} of them mid-save; checkpoint every step)",
                expected="resume from the newest verified checkpoint; no temp dirs left",
                observed=f"exit {final.returncode}; {said(final, 'resumed from', 'skipped')}; temp dirs left: "
                         f"{len(leftovers)}",
                ok=final.returncode == 0 and not leftovers, seconds=time.time() - t0, identical=b.identical(run))


def _stopped_at_4(b: Bench, name: str) -> Path:
    run = b.fresh(name)
    proc = b.run(run, *RECIPE, "train.stop_at=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def pointer(b: Bench, name: str, content: bytes | None, label: str) -> dict:
    run = _stopped_at_4(b, name)
    latest = run / "checkpoints" / "latest"
    if content is None:
        shutil.rmtree(run / "checkpoints" / "step-4")  # latest now dangles
    else:
        latest.write_bytes(content)
    t0 = time.time()
    proc = b.run(run, *RECIPE)
    want = "step-2" if content is None else "step-4"
    return dict(fault=label, expected=f"resume from {want} (newest that verifies), say so",
                observed=f"exit {proc.returncode}; {said(proc, 'resumed from')}",
                ok=proc.returncode == 0 and f"{want} at step" in proc.stdout, seconds=time.time() - t0,
                identical=b.identical(run))


def corrupt_newest(b: Bench, name: str, damage, label: str) -> dict:
    run = _stopped_at_4(b, name)
    damage(run / "checkpoints" / "step-4")
    t0 = time.time()
    proc = b.run(run, *RECIPE)
    return dict(fault=label, expected="skip step-4 naming the file, resume from step-2",
                observed=f"exit {proc.returncode}; {said(proc, 'skipped')}",
                ok=proc.returncode == 0 and "step-2 at step 2" in proc.stdout, seconds=time.time() - t0,
                identical=b.identical(run))


def none_verifies(b: Bench) -> dict:
    run = _stopped_at_4(b, "none_verifies")
    for step in (2, 4):
        (run / "checkpoints" / f"step-{step}" / "model.safetensors").write_bytes(b"")
    before = (run / "metrics.jsonl").read_bytes()
    t0 = time.time()
    proc = b.run(run, *RECIPE)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    return dict(fault="every checkpoint corrupt", expected="exit 2, one line naming them; nothing overwritten",
                observed=f"exit {proc.returncode}; {lines[-1][:220] if lines else ''}",
                ok=proc.returncode == 2 and len(lines) == 1 and (run / "metrics.jsonl").read_bytes() == before,
                identical="n/a", seconds=time.time() - t0)


def disk_full(b: Bench) -> dict:
    label = "disk full during a save (8 MiB tmpfs)"
    if os.geteuid() != 0 or not shutil.which("mount"):
        return dict(fault=label, expected="", observed="skipped: needs root for a tmpfs", ok=None,
                    identical="n/a", seconds=0.0)
    mount = b.work / "tmpfs"
    mount.mkdir(exist_ok=True)
    if os.system(f"mount -t tmpfs -o size=8m tmpfs {mount}") != 0:
        return dict(fault=label, expected="", observed="skipped: mount refused", ok=None, identical="n/a",
                    seconds=0.0)
    try:
        run = mount / "run"
        filler = mount / "filler"
        t0 = time.time()
        proc = b.run(run, *RECIPE, "checkpoint.interval=1", "checkpoint.keep_last=1000")  # fills the disk
        latest = (run / "checkpoints" / "latest").read_text() if (run / "checkpoints" / "latest").is_file() else ""
        partial = list((run / "checkpoints").glob(".tmp-*"))
        seconds = time.time() - t0
        filler.write_bytes(b"")
        for old in sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))[:-1]:
            shutil.rmtree(old)  # the operator frees space
        again = b.run(run, *RECIPE, "checkpoint.interval=1", "checkpoint.keep_last=2")
        return dict(fault=label, expected="exit 1, one line with step, path, cause; latest on the last good one; "
                    "no partial files; resume after freeing space",
                    observed=f"exit {proc.returncode}; {said(proc, 'error:')}; latest={latest}; partial dirs "
                             f"{len(partial)}; rerun exit {again.returncode}",
                    ok=proc.returncode == 1 and "no space left on device" in proc.stderr and not partial and
                    again.returncode == 0, seconds=seconds, identical=b.identical(run))
    finally:
        os.system(f"umount {mount}")


def concurrent(b: Bench) -> dict:
    """A requeued job starting while the old one still runs. The first run is long (constant lr, so its losses do
    not depend on train.steps) and stopped with SIGTERM once the second has been refused."""
    run, reference = b.fresh("concurrent"), b.fresh("concurrent-reference")
    constant = ["train.schedule=constant", "checkpoint.interval=1"]
    b.run(reference, "train.steps=6", *constant)
    first = b.start(run, "train.steps=100000", *constant)
    wait_for_step(run, 1, first)
    t0 = time.time()
    second = b.run(run, "train.steps=100000", *constant)
    seconds = time.time() - t0
    wait_for_step(run, 6, first)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
    lines = [x for x in second.stderr.splitlines() if x.strip()]
    ours, want = b.losses(run), b.losses(reference)
    same = "yes" if want and {k: ours.get(k) for k in want} == want else "no"
    return dict(fault="a second run on the same run dir", expected="second exits 2 naming the holder; first "
                "unaffected", observed=f"second exit {second.returncode}; {lines[-1][:200] if lines else ''}; "
                f"first exit {first.returncode} after SIGTERM", ok=second.returncode == 2 and len(lines) == 1 and
                first.returncode == 0, seconds=seconds, identical=same)


def stale_lock(b: Bench) -> dict:
    run = _stopped_at_4(b, "stale_lock")
    holder = {"host": socket.gethostname(), "pid": 2**22 + 4321, "start_time": time.time() - 600,
              "heartbeat": time.time() - 20}  # a killed job's lock: its pid is gone
    (run / ".lock").write_text(json.dumps(holder))
    t0 = time.time()
    proc = b.run(run, *RECIPE)
    return dict(fault="stale lock (holder killed, pid gone)", expected="taken over with a message",
                observed=f"exit {proc.returncode}; {said(proc, 'taking over')}",
                ok=proc.returncode == 0 and "taking over the lock" in proc.stdout, seconds=time.time() - t0,
                identical=b.identical(run))


def frozen_rank(b: Bench) -> dict:
    run = b.fresh("frozen")
    proc = b.start(run, *RECIPE, "parallel.timeout_s=5", nproc=2)
    wait_for_step(run, 3, proc)
    victim = worker_pid(proc.pid, 1)
    os.kill(victim, signal.SIGSTOP)
    t0 = time.time()
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    seconds = time.time() - t0
    line = said(subprocess.CompletedProcess([], proc.returncode, out, err), "did not arrive", "no progress")
    again = b.run(run, *RECIPE, "parallel.timeout_s=5", nproc=2)
    return dict(fault="frozen rank (SIGSTOP rank 1 of 2, parallel.timeout_s=5)",
                expected="job ends naming rank 1 within the timeout plus grace; resume",
                observed=f"exit {proc.returncode} after {seconds:.0f} s; {line}; rerun exit {again.returncode}",
                ok=proc.returncode != 0 and "rank(s) 1" in line and again.returncode == 0,
                seconds=seconds, identical=b.identical(run, nproc=2))


def signal_one_rank(b: Bench) -> dict:
    run = b.fresh("signal_one_rank")
    proc = b.start(run, *RECIPE[:1], "train.steps=100000", "checkpoint.interval=0", nproc=2)
    wait_for_step(run, 2, proc)
    os.kill(worker_pid(proc.pid, 1), signal.SIGUSR1)
    t0 = time.time()
    out, err = proc.communicate(timeout=240)
    line = said(subprocess.CompletedProcess([], proc.returncode, out, err), "stopped (")
    return dict(fault="SIGUSR1 to rank 1 only (2 processes)", expected="every rank stops at the step boundary, "
                "checkpoint saved, reason names rank 1", observed=f"exit {proc.returncode}; {line}",
                ok=proc.returncode == 0 and "on rank 1" in line and "checkpoint saved" in line, identical="n/a",
                seconds=time.time() - t0)


def changed_hparams(b: Bench) -> dict:
    run = _stopped_at_4(b, "changed_hparams")
    t0 = time.time()
    proc = b.run(run, *RECIPE, "train.lr=1e-4", "train.beta2=0.99")
    lines = [x for x in proc.stdout.splitlines() if "(from the recipe)" in x]
    return dict(fault="changed lr and beta2 on resume", expected="the recipe wins; each change printed once",
                observed=f"exit {proc.returncode}; {' | '.join(lines)}",
                ok=proc.returncode == 0 and len(lines) == 2, identical="n/a (intended change)",
                seconds=time.time() - t0)


def changed_model(b: Bench) -> dict:
    run = _stopped_at_4(b, "changed_model")
    before = (run / "config.yaml").read_bytes(), (run / "tokenizer" / "tokenizer.model").read_bytes()
    t0 = time.time()
    proc = b.run(run, *RECIPE, "model.d_model=128")
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    after = (run / "config.yaml").read_bytes(), (run / "tokenizer" / "tokenizer.model").read_bytes()
    return dict(fault="changed model shape on resume", expected="exit 2, one line; run dir untouched",
                observed=f"exit {proc.returncode}; {lines[-1][:200] if lines else ''}; untouched: {after == before}",
                ok=proc.returncode == 2 and len(lines) == 1 and after == before, identical="n/a",
                seconds=time.time() - t0)


FAULTS = {
    "kill9": kill9,
    "dangling_latest": lambda b: pointer(b, "dangling", None, "`latest` names a deleted checkpoint"),
    "empty_latest": lambda b: pointer(b, "empty", b"", "`latest` empty"),
    "garbage_latest": lambda b: pointer(b, "garbage", b"\x00\xffgarbage", "`latest` holds garbage"),
    "corrupt_newest": lambda b: corrupt_newest(
        b, "truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:999]),
        "newest checkpoint: truncated model.safetensors"),
    "missing_optimizer": lambda b: corrupt_newest(b, "no_opt", lambda d: (d / "optimizer.pt").unlink(),
                                                  "newest checkpoint: optimizer.pt missing"),
    "garbage_trainer": lambda b: corrupt_newest(b, "bad_json", lambda d: (d / "trainer.json").write_text("{x"),
                                                "newest checkpoint: garbage trainer.json"),
    "none_verifies": none_verifies,
    "disk_full": disk_full,
    "concurrent": concurrent,
    "stale_lock": stale_lock,
    "frozen_rank": frozen_rank,
    "signal_one_rank": signal_one_rank,
    "changed_hparams": changed_hparams,
    "changed_model": changed_model,
}


def markdown(rows: list[dict]) -> str:
    out = ["| fault | expected | observed | as expected | resumed losses identical | s |", "|---|---|---|---|---|---|"]
    for r in rows:
        ok = {True: "yes", False: "**no**", None: "skipped"}[r["ok"]]
        observed = r["observed"].replace("|", "/")
        out.append(f"| {r['fault']} | {r['expected']} | {observed} | {ok} | {r['identical']} | {r['seconds']:.1f} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.2))
    colors = ["tab:green" if r["ok"] else ("tab:gray" if r["ok"] is None else "tab:red") for r in rows]
    ax.barh([r["fault"][:48] for r in rows], [r["seconds"] for r in rows], color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("seconds of the faulty command (green: as expected)")
    ax.set_title("lctrain fault matrix (CPU, tiny model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated fault names: " + ", ".join(FAULTS))
    parser.add_argument("--out", default=str(RESULTS / "faults_cpu.json"))
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        print(f"error: --only: unknown {unknown}; expected some of {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="lctrain-faults-") as tmp:
        bench = Bench(Path(tmp))
        for name in names:
            print(f"[{len(rows) + 1}/{len(names)}] {name} ...", flush=True)
            try:
                row = FAULTS[name](bench)
            except Exception as exc:  # noqa: BLE001 - a broken case is a row, not the end of the matrix
                row = dict(fault=name, expected="", observed=f"bench error: {type(exc).__name__}: {exc}"[:300],
                           ok=False, identical="n/a", seconds=0.0)
            row["name"] = name
            row["observed"] = row["observed"].replace(str(bench.work), "<tmp>")  # no host paths in the results
            rows.append(row)
            print(f"    {'ok' if row['ok'] else 'NOT OK' if row['ok'] is False else 'skipped'}: {row['observed']}",
                  flush=True)
    import torch
    machine = (f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
               f"python {platform.python_version()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "steps": STEPS, "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(markdown(rows))
    print(f"\n{machine}; written {out} and {out.with_suffix('.png')}")
    return 0 if all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
