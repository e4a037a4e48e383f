"""Packing: windows of seq_len + 1 stream tokens, positions restarting at documents and windows, masked labels."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lctrain.data.packing import IGNORE_INDEX, PackedStream, collate
from lctrain.data.token_store import TokenSplit
from lctrain.models.context import cu_seqlens_from_positions

BOS, EOS = 2, 3


def make_split(lengths, start=100):
    """Documents with distinct token values: document d holds start + 1000 d + (0, 1, 2, ...)."""
    docs = [np.arange(n, dtype=np.uint16) + start + 1000 * d for d, n in enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenSplit(np.concatenate(docs) if docs else np.zeros(0, np.uint16), offsets), docs


def reference_stream(docs, order):
    """The expected stream as (token, document number, position in document) triples."""
    triples = []
    for m, d in enumerate(order):
        framed = [BOS, *docs[d].tolist(), EOS]
        triples.extend((tok, m, q) for q, tok in enumerate(framed))
    return triples


@pytest.mark.parametrize("lengths, seq_len", [
    ([5, 1, 7, 1, 1, 12, 3], 4),  # one-token documents, a document longer than a window
    ([40], 8),  # a single document spanning several windows
    ([0, 2, 0, 30, 9], 6),  # empty bodies still give BOS EOS
])
def test_windows_follow_the_stream(lengths, seq_len):
    split, docs = make_split(lengths)
    order = list(reversed(range(len(lengths))))
    stream = PackedStream([split], np.zeros(len(order), np.int64), np.array(order), seq_len, BOS, EOS)
    expected = reference_stream(docs, order)
    assert stream.total_tokens == len(expected)
    assert len(stream) == (len(expected) - 1) // seq_len
    for w in range(len(stream)):
        tokens, segments, positions = stream.window(w)
        window = expected[w * seq_len: w * seq_len + seq_len + 1]
        assert tokens.tolist() == [t for t, _, _ in window]
        assert segments.tolist() == [m for _, m, _ in window]
        # position = position in the document, minus where the document entered this window
        entry = {m: q for _, m, q in reversed(window)}
        assert positions.tolist() == [q - entry[m] for _, m, q in window]
        ex = stream.example(w)
        assert ex["input_ids"].tolist() == tokens[:-1].tolist()
        for t in range(seq_len):
            crosses = window[t][1] != window[t + 1][1]
            assert ex["labels"][t] == (IGNORE_INDEX if crosses else window[t + 1][0])
            # -100 exactly when an EOS input would predict the next document's BOS
            assert crosses == (window[t][0] == EOS and window[t + 1][0] == BOS)
    with pytest.raises(IndexError):
        stream.window(len(stream))


def test_every_target_appears_once_across_consecutive_windows():
    split, docs = make_split([9, 3, 14, 1])
    stream = PackedStream([split], np.zeros(4, np.int64), np.arange(4), 5, BOS, EOS)
    targets = np.concatenate([stream.window(w)[0][1:] for w in range(len(stream))])
    flat = [t for t, _, _ in reference_stream(docs, range(4))]
    assert targets.tolist() == flat[1:1 + len(targets)]


def test_positions_restart_at_window_and_document_starts():
    split, _ = make_split([10, 2])
    stream = PackedStream([split], np.zeros(2, np.int64), np.arange(2), 8, BOS, EOS)
    # stream: B d0..d9 E B e0 e1 E  (16 tokens) -> windows [0, 9) and [8, 17) would need 17; only one window
    assert len(stream) == 1
    ex0 = stream.example(0)
    assert ex0["position_ids"].tolist() == list(range(8))
    longer = PackedStream([split], np.zeros(2, np.int64), np.arange(2), 5, BOS, EOS)
    ex1 = longer.example(1)  # stream tokens 5..10: d4..d9 E (doc 0 cut at the window start)
    assert ex1["position_ids"].tolist() == [0, 1, 2, 3, 4]
    ex2 = longer.example(2)  # tokens 10..15: d9 E | B e0 e1 E
    assert ex2["position_ids"].tolist() == [0, 1, 0, 1, 2]
    assert ex2["labels"].tolist() == [EOS, IGNORE_INDEX, split.document(1)[0], split.document(1)[1], EOS]


def test_several_sources_and_collate_matches_the_model_boundaries():
    first, _ = make_split([6, 2, 9], start=100)
    second, _ = make_split([4, 11], start=5000)
    sources = np.array([1, 0, 0, 1, 0])
    doc_ids = np.array([0, 2, 0, 1, 1])
    stream = PackedStream([first, second], sources, doc_ids, 7, BOS, EOS)
    tokens = np.concatenate([stream.window(w)[0][:-1] for w in range(len(stream))])
    assert tokens[1] == second.document(0)[0]
    assert 4 + 2 + 9 + 2 + 6 + 2 in np.flatnonzero(tokens == BOS)  # the 4th document starts where expected
    batch = collate([stream.example(w) for w in range(3)])
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "input_ids": ((3, 7), torch.int64), "labels": ((3, 7), torch.int64),
        "position_ids": ((3, 7), torch.int64), "cu_seqlens": ((int(batch["cu_seqlens"].numel()),), torch.int32)}
    assert torch.equal(batch["cu_seqlens"], cu_seqlens_from_positions(batch["position_ids"]))
    assert batch["cu_seqlens"][0] == 0 and batch["cu_seqlens"][-1] == 21


def _labels_by_stream_target(stream):
    """{stream offset of a target token: its label} over every window (each target appears exactly once)."""
    found = {}
    for w in range(len(stream)):
        labels = stream.example(w)["labels"]
        for t, label in enumerate(labels):
            found[w * stream.seq_len + t + 1] = int(label)
    return found


@pytest.mark.parametrize("seq_len", [4, 7, 16])  # documents cut by windows, and several documents per window
def test_target_mask_keeps_only_marked_targets_and_leaves_text_unchanged(seq_len):
    text, _ = make_split([5, 9, 3], start=100)
    masked_plain, _ = make_split([6, 2, 10], start=5000)
    target_mask = np.zeros(len(masked_plain.tokens), dtype=bool)
    target_mask[[1, 4, 7, 12, 17]] = True  # body tokens 1 and 4 of doc 0, 1 of doc 1, 4 and 9 of doc 2
    masked = SimpleNamespace(tokens=masked_plain.tokens, offsets=masked_plain.offsets, target_mask=target_mask)
    sources, doc_ids = np.array([1, 0, 1, 0, 1, 0]), np.array([2, 1, 0, 0, 1, 2])
    with_mask = PackedStream([text, masked], sources, doc_ids, seq_len, BOS, EOS)
    without_mask = PackedStream([text, masked_plain], sources, doc_ids, seq_len, BOS, EOS)
    assert len(with_mask) == len(without_mask) > 0
    for w in range(len(with_mask)):  # inputs and positions do not depend on the mask
        a, b = with_mask.example(w), without_mask.example(w)
        assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["position_ids"], b["position_ids"])
    masked_labels, plain_labels = _labels_by_stream_target(with_mask), _labels_by_stream_target(without_mask)
    trained_masked = set()
    for m, (s, d) in enumerate(zip(sources, doc_ids)):
        start = int(with_mask.starts[m])
        body = range(start + 1, int(with_mask.starts[m + 1]) - 1)  # stream offsets of the body tokens
        framed = [start, *body, start + len(body) + 1]  # BOS, body, EOS
        for offset in framed:
            if offset not in masked_labels:  # beyond the last full window
                continue
            if s == 0:  # text: labels exactly as without any mask
                assert masked_labels[offset] == plain_labels[offset]
            elif offset in body and target_mask[masked.offsets[d] + offset - start - 1]:
                assert masked_labels[offset] == plain_labels[offset] != IGNORE_INDEX
                trained_masked.add(offset)
            else:  # unmarked body tokens, BOS and EOS of a masked document
                assert masked_labels[offset] == IGNORE_INDEX
    assert trained_masked  # the check above ran on marked targets
