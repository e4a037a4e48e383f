"""Host-side document metadata (`lctrain.models.documents`) agrees with the device-side derivations."""
import numpy as np
import pytest
import torch

from lctrain.models.context import BatchContext, cu_seqlens_from_positions, document_ids
from lctrain.models.documents import Documents


def _positions(rows):
    """rows: list of document-length lists, each summing to T."""
    return torch.tensor([[p for n in row for p in range(n)] for row in rows])


@pytest.mark.parametrize("rows", [[[5]], [[1, 1, 1]], [[3, 4], [7]], [[2, 5], [1, 1, 5], [7]]])
def test_documents_match_device_derivation(rows):
    positions = _positions(rows)
    docs = Documents.from_positions(positions)
    assert torch.equal(docs.cu_seqlens("cpu"), cu_seqlens_from_positions(positions))
    assert torch.equal(docs.document_ids("cpu"), document_ids(positions))
    assert docs.lengths == tuple(n for row in rows for n in row)
    assert docs.num_docs == sum(len(r) for r in rows)
    assert docs.max_len == max(n for row in rows for n in row)
    assert docs.single_doc_rows == all(len(r) == 1 for r in rows)
    assert docs.cu_seqlens_cpu.dtype == torch.int32 and docs.cu_seqlens_cpu.device.type == "cpu"


def test_row_start_mid_document_starts_a_document():
    # a row that continues a document from the previous window (position != 0 at column 0) still starts one
    positions = torch.tensor([[3, 4, 0, 1], [5, 6, 7, 8]])
    docs = Documents.from_positions(positions)
    assert docs.offsets == (0, 2, 4, 8)
    assert docs.single_doc_rows is False


def test_context_uses_host_positions_without_reading_device_tensor():
    positions = _positions([[2, 3], [5]])

    class Poisoned(torch.Tensor):  # any host read of the "device" tensor would fail
        def cpu(self):
            raise AssertionError("device positions were read back")

        def numpy(self):
            raise AssertionError("device positions were read back")

    device_positions = positions.clone().as_subclass(Poisoned)
    ctx = BatchContext.from_positions(device_positions, host_positions=positions)
    assert ctx.docs.offsets == (0, 2, 5, 10)
    assert np.array_equal(ctx.document_ids.numpy(), document_ids(positions).numpy())
