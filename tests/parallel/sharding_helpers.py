"""Independent (test-side) derivations of what sharding must produce."""
import torch


def full_doc_ids(positions: torch.Tensor) -> torch.Tensor:
    """Document index per token: a new document at every position 0 and at each row start."""
    docs = torch.zeros_like(positions)
    for r in range(positions.shape[0]):
        current = 0
        for t in range(positions.shape[1]):
            if t > 0 and positions[r, t] == 0:
                current += 1
            docs[r, t] = current
    return docs
