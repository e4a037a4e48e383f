"""MoA profiling: how much each attention head's loss would rise under each candidate elastic rule.

For calibration windows of N tokens the model first continues the first N - R tokens itself (greedy, R response
tokens); the loss is its cross-entropy on that continuation, so the profile measures how far a sparse mask moves
the model from its own dense output rather than from some reference text. One backward through the dense
attention probabilities A (materialised per layer by `probed_attention`) gives, for every head and every entry,
the first-order loss change of masking that entry (the row renormalises over the rest):

    E_ij = A_ij / (1 - A_ij) * (sum_n dL/dA_in * A_in - dL/dA_ij)

A rule's loss for a head is the sum of E over the causal entries the rule drops, averaged over windows.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from lctrain.config import ConfigError
from lctrain.models.context import BatchContext

PROFILE_FORMAT = "lctrain-moa-profile"  # the file `moa search` reads (checked by `search.check_profile`)
PROFILE_VERSION = 1


def influence(probs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """E `[..., T, T]` from attention probabilities and dL/dprobs (same shape). Entries with A = 1 (a query that
    sees only itself) cannot be masked and get 0."""
    weighted = (grad * probs).sum(dim=-1, keepdim=True)
    free = (1 - probs).clamp_min(0)
    ratio = torch.where(free > 1e-12, probs / free.clamp_min(1e-12), torch.zeros_like(probs))
    return ratio * (weighted - grad)


def attention_layers(lm) -> list[int]:
    return [i for i, t in enumerate(lm.layer_types) if t == "attn"]


def response_loss(lm, tokens: torch.Tensor, response: int, probe=None) -> torch.Tensor:
    """Mean cross-entropy of the last `response` tokens of `tokens` `[T]` given what precedes them."""
    length = tokens.numel()
    positions = torch.arange(length, device=tokens.device)[None]
    ctx = BatchContext(positions, extras={"attn_probe": probe} if probe is not None else {})
    logits = lm(tokens[None], ctx=ctx, return_logits=True).logits[0]
    first = length - response
    scored = logits[first - 1:length - 1]
    return torch.nn.functional.cross_entropy(scored.to(torch.promote_types(scored.dtype, torch.float32)),
                                             tokens[first:])


def layer_influences(lm, tokens: torch.Tensor, response: int) -> tuple[dict[int, torch.Tensor], float]:
    """{layer: E `[H, T, T]`} for one calibration window, and its dense response loss."""
    kept: dict[int, torch.Tensor] = {}

    def probe(layer: int, probs: torch.Tensor) -> torch.Tensor:
        # With frozen weights the first probabilities are where the graph starts; later layers' depend on them.
        if probs.requires_grad:
            probs.retain_grad()
        else:
            probs.requires_grad_(True)
        kept[layer] = probs
        return probs

    trainable = [p for p in lm.parameters() if p.requires_grad]
    for param in trainable:  # only dL/dA is needed: no weight gradients are computed
        param.requires_grad_(False)
    try:
        loss = response_loss(lm, tokens, response, probe)
        loss.backward()
    finally:
        for param in trainable:
            param.requires_grad_(True)
    out = {layer: influence(p.detach()[0], p.grad[0]) for layer, p in kept.items()}
    return out, float(loss.detach())


def calibration_windows(stream: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """`count` windows of `length` tokens spread evenly over the token stream."""
    if stream.numel() < length:
        raise ConfigError(f"moa profile: the calibration data has {stream.numel()} tokens, fewer than the "
                          f"profiled length {length}; pass --data with more text or lower --lengths")
    last = stream.numel() - length
    starts = torch.linspace(0, last, count).round().long().tolist() if count > 1 else [0]
    return [stream[s:s + length] for s in starts]


def profile(lm, stream: torch.Tensor, lengths: list[int], rules, sink: int, docs: int, response: int | None,
            progress: bool = True) -> dict:
    """Profile dict (format `lctrain-moa-profile`, see `lctrain.moa.search`)."""
    from lctrain.eval.generate import generate
    from lctrain.moa.rules import density, rule_mask

    layers = attention_layers(lm)
    if not layers:
        raise ConfigError("moa profile: the model has no `attn` layers to profile")
    heads = lm.cfg.n_heads
    loss = torch.zeros(len(layers), heads, len(rules), len(lengths), dtype=torch.float64)
    dens = torch.zeros(len(rules), len(lengths), dtype=torch.float64)
    dense_loss = []
    device = next(lm.parameters()).device
    bar = _progress(len(lengths) * docs, progress)
    for n_idx, length in enumerate(lengths):
        resp = response or max(1, length // 8)
        if resp >= length:
            raise ConfigError(f"moa profile --response: {resp} must be smaller than the profiled length {length}")
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        dropped = [causal & ~rule_mask(r, sink, length).to(device) for r in rules]
        for r_idx, r in enumerate(rules):
            dens[r_idx, n_idx] = density(r.window(length), sink, length)
        total = 0.0
        for window in calibration_windows(stream, length, docs):
            window = window.to(device)
            context = window[:length - resp]
            continuation = generate(lm, context[None], resp)[0]
            tokens = torch.cat([context, continuation])
            influences, value = layer_influences(lm, tokens, resp)
            total += value
            for l_idx, layer in enumerate(layers):
                e = influences[layer].double()
                for r_idx, mask in enumerate(dropped):
                    loss[l_idx, :, r_idx, n_idx] += (e * mask).sum(dim=(-1, -2)).cpu() / docs
            bar.update(1)
        dense_loss.append(total / docs)
    bar.close()
    return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "rules": [[r.alpha, r.beta] for r in rules], "sink": sink,
            "lengths": list(lengths), "layers": layers, "n_heads": heads, "loss": loss, "density": dens,
            "num_docs": docs, "dense_loss": dense_loss}


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="moa profile", disable=not enabled, dynamic_ncols=True)


def profile_main(argv: list[str]) -> int:
    from lctrain.eval.command import _device, held_out_stream
    from lctrain.eval.target import load_target
    from lctrain.moa.rules import DEFAULT_ALPHAS, DEFAULT_BETAS, parse_grid

    from lctrain.cli_args import OneLineParser, float_list, int_list

    p = OneLineParser(prog="moa profile", description="Per-head loss of each elastic attention rule.")
    p.add_argument("path", help="run directory, checkpoint directory or export")
    p.add_argument("--lengths", type=int_list, required=True, help="input lengths N, comma-separated")
    p.add_argument("--out", required=True, help="profile file to write (torch .pt)")
    p.add_argument("--docs", type=int, default=8, help="calibration windows per length")
    p.add_argument("--response", type=int, help="tokens the model continues and is scored on (default N/8)")
    p.add_argument("--alphas", type=float_list, default=list(DEFAULT_ALPHAS), help="rule grid: alpha values")
    p.add_argument("--betas", type=float_list, default=list(DEFAULT_BETAS), help="rule grid: beta values")
    p.add_argument("--sink", type=int, default=64, help="initial tokens every head keeps")
    p.add_argument("--data", help=".txt or .jsonl calibration file (default: the run's held-out split)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.docs < 1 or args.sink < 0 or (args.response is not None and args.response < 1):
        raise ConfigError("moa profile: --docs and --response must be >= 1 and --sink >= 0")
    try:
        rules = parse_grid(args.alphas, args.betas)
    except ValueError as exc:
        raise ConfigError(f"moa profile: {exc}") from None
    started = time.time()
    target = load_target(args.path, _device(args.device))
    tokenizer = target.require_tokenizer("moa profile")
    if args.data:
        from lctrain.eval.perplexity import frame_documents, read_documents
        stream = frame_documents(tokenizer.encode_batch(read_documents(args.data)), tokenizer.bos_id,
                                 tokenizer.eos_id)
    else:
        stream = held_out_stream(target, not args.no_progress)
    lm = target.model.float().eval()
    result = profile(lm, stream, args.lengths, rules, args.sink, args.docs, args.response, not args.no_progress)
    result["source"] = str(args.path)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(result, tmp)
    tmp.replace(out)
    print(f"profiled {len(result['layers'])} attention layers x {result['n_heads']} heads x {len(rules)} rules at "
          f"N = {args.lengths} ({args.docs} windows each) in {time.time() - started:.0f}s -> {out}")
    return 0
