"""`python -m lctrain eval RUN_DIR_OR_CHECKPOINT --task TASK [options]`: run one evaluation, print a table, write
JSON (`--out`) and, for a run, TensorBoard scalars under `<run>/tb` (tags `eval_<task>/...` at the checkpoint's
step). Bad input raises `ConfigError`: one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lctrain.cli_args import OneLineParser, float_list, int_list, positive_int
from lctrain.config import ConfigError

TASKS = ("ppl", "passkey", "niah", "mqar")


def _depths(text: str) -> list[float]:
    values = float_list(text)
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected depths in [0, 1], e.g. 0,0.5,1")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="eval", description="Evaluate a run, checkpoint or export.")
    p.add_argument("path", help="run directory, checkpoint directory or export directory")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", help="ppl: .txt or .jsonl file to score (default: the run's held-out split); "
                                  "niah: haystack text")
    p.add_argument("--lengths", type=int_list, help="context lengths, comma-separated (default: training length)")
    p.add_argument("--stride", type=positive_int, help="ppl: sliding-window stride (default: length / 2)")
    p.add_argument("--depths", type=_depths, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="niah: needle depths")
    p.add_argument("--trials", type=positive_int, help="passkey/niah/mqar: prompts per setting (20 / 4 / 256)")
    p.add_argument("--kv-pairs", type=int_list, default=[4, 8, 16], help="mqar: key-value pairs per sequence")
    p.add_argument("--task-vocab", type=positive_int, help="mqar: task ids (default: the run's mqar source, else 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-length", type=positive_int, help="raise the cap on lengths (default: 16 x training length)")
    p.add_argument("--out", help="write results as JSON here")
    p.add_argument("--heatmap", help="niah: PNG path (default: beside --out, else niah.png in the run's eval/)")
    p.add_argument("--attn-plan", help="MoA plan JSON (`lctrain moa search`) applied to the attention layers")
    p.add_argument("--kv-budget", type=positive_int, help="decoding tasks: H2O cache of this many entries per kv head")
    p.add_argument("--kv-recent", type=int, help="H2O: newest entries always kept (default: half the budget)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write the run's TensorBoard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _device(choice: str) -> str:
    import torch
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"eval --device: {choice!r} requested but no CUDA device is available; use cpu")
    if not (choice == "cpu" or choice.startswith("cuda")):
        raise ConfigError(f"eval --device: {choice!r} is not allowed; expected auto, cpu or cuda[:N]")
    return choice


def held_out_stream(target, progress: bool):
    """The run's held-out documents, framed and concatenated (what training's eval loss is computed on)."""
    from lctrain.data import build_data
    from lctrain.eval.perplexity import frame_documents

    if target.config is None:
        raise ConfigError("eval --task ppl: no --data given and the run's config.yaml cannot rebuild its data; "
                          "pass --data FILE")
    data = build_data(target.config, progress=progress)
    docs = [split.document(i) for store in data.tokens for split in [store.eval] for i in range(len(split))]
    if not docs:
        raise ConfigError("eval --task ppl: the run has no held-out documents (data.eval_fraction is 0); pass --data")
    return frame_documents(docs, data.tokenizer.bos_id, data.tokenizer.eos_id)


def _haystack(target, args, tokenizer) -> list[int]:
    from lctrain.data.synthetic import PASSKEY_FILLER
    from lctrain.eval.perplexity import read_documents

    if args.data:
        return tokenizer.encode("\n\n".join(read_documents(args.data)))
    if target.config is not None and all(s.type not in ("mqar", "passkey") for s in target.config.data.sources):
        try:
            stream = held_out_stream(target, not args.no_progress)
            return [int(t) for t in stream if int(t) not in (tokenizer.bos_id, tokenizer.eos_id)]
        except ConfigError:
            pass  # no held-out split: fall back to the filler
    return tokenizer.encode(PASSKEY_FILLER * 64)


def run_task(target, args) -> tuple[list[dict], list[str], dict[str, float], dict]:
    """Run `args.task` on `target`: (rows, table columns, TensorBoard scalars, settings)."""
    progress = not args.no_progress
    lengths = args.lengths or [target.train_seq_len]
    from lctrain.eval.target import check_lengths
    check_lengths(target, lengths, args.max_length)
    task = args.task
    if task == "mqar":
        from lctrain.eval.mqar import MQARSetting, evaluate_mqar, mqar_task_vocab
        task_vocab = args.task_vocab or mqar_task_vocab(target.config) or 256
        settings = [MQARSetting(n, kv) for n in lengths for kv in args.kv_pairs]
        rows = evaluate_mqar(target.model, settings, target.tokenizer, task_vocab, args.trials or 256,
                             args.batch_size, args.seed, target.model.cfg.vocab_size, progress)
        scalars = {f"eval_mqar/acc@{r['seq_len']}_kv{r['num_kv_pairs']}": r["accuracy"] for r in rows}
        return rows, ["seq_len", "num_kv_pairs", "accuracy", "correct", "queries"], scalars, {"task_vocab": task_vocab}
    tokenizer = target.require_tokenizer(task)
    if task == "ppl":
        from lctrain.eval.perplexity import frame_documents, perplexity, read_documents
        if args.data:
            docs = read_documents(args.data)
            stream = frame_documents(tokenizer.encode_batch(docs), tokenizer.bos_id, tokenizer.eos_id)
        else:
            stream = held_out_stream(target, progress)
        rows = []
        for length in lengths:
            stride = min(args.stride or max(length // 2, 1), length)
            rows.append(perplexity(target.model, stream, length, stride, progress, desc=f"ppl@{length}"))
        scalars = {f"eval_ppl/ppl@{r['length']}": r["ppl"] for r in rows}
        return rows, ["length", "stride", "tokens", "loss", "ppl"], scalars, {"data": args.data or "held-out"}
    if task == "passkey":
        from lctrain.eval.passkey import evaluate_passkey
        rows = evaluate_passkey(target.model, tokenizer, lengths, args.trials or 20, args.seed, args.batch_size,
                                progress)
        scalars = {f"eval_passkey/acc@{r['length']}": r["accuracy"] for r in rows}
        return rows, ["length", "accuracy", "correct", "trials"], scalars, {}
    from lctrain.eval.niah import evaluate_niah
    rows = evaluate_niah(target.model, tokenizer, _haystack(target, args, tokenizer), lengths, args.depths,
                         args.trials or 4, args.seed, args.batch_size, progress)
    scalars = {f"eval_niah/acc@{r['length']}_depth{r['depth']:g}": r["accuracy"] for r in rows}
    return rows, ["length", "depth", "accuracy", "correct", "trials"], scalars, {"depths": args.depths}


def eval_main(argv: list[str]) -> int:
    import torch

    from lctrain.eval.report import format_table, log_tensorboard, write_json
    from lctrain.eval.target import load_target

    args = build_parser().parse_args(argv)
    if args.kv_recent is not None and args.kv_budget is None:
        raise ConfigError("eval --kv-recent: needs --kv-budget")
    torch.manual_seed(args.seed)
    started = time.time()
    target = load_target(args.path, _device(args.device))
    if args.attn_plan:
        from lctrain.moa.apply import set_attn_plan
        set_attn_plan(target.model, args.attn_plan)
    if args.kv_budget is not None or args.kv_recent is not None:
        from lctrain.models.h2o import set_kv_budget
        try:
            set_kv_budget(target.model, args.kv_budget, args.kv_recent)
        except ValueError as exc:
            raise ConfigError(f"eval --kv-budget: {exc}") from None
    rows, columns, scalars, settings = run_task(target, args)
    print(format_table(rows, columns), flush=True)
    payload = {"task": args.task, "path": str(args.path), "attn_plan": args.attn_plan,
               "kv_budget": args.kv_budget, "step": target.step, "seed": args.seed,
               "device": str(next(target.model.parameters()).device), "settings": settings, "results": rows,
               "seconds": round(time.time() - started, 2)}
    if args.task == "niah":
        from lctrain.eval.niah import plot_heatmap
        default_dir = Path(args.out).parent if args.out else (target.run_dir / "eval" if target.run_dir else Path("."))
        heatmap = Path(args.heatmap) if args.heatmap else default_dir / "niah.png"
        payload["heatmap"] = str(plot_heatmap(rows, heatmap, f"needle in a haystack: {Path(args.path).name}"))
        print(f"heatmap: {heatmap}")
    if args.out:
        print(f"results: {write_json(args.out, payload)}")
    if target.run_dir is not None and not args.no_tensorboard:
        log_tensorboard(target.run_dir, target.step, scalars)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(eval_main(sys.argv[1:]))
