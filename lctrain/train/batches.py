"""Turn a data-pipeline batch into this rank's model inputs and BatchContext (sequence-parallel sharding here)."""
from __future__ import annotations

import torch

from lctrain.data.landmarks import insert_landmarks, landmark_layout
from lctrain.models.context import BatchContext


class BatchPreparer:
    def __init__(self, cfg, env, layout):
        self.cfg, self.env, self.layout = cfg, env, layout
        self.sp_groups = None
        if layout.sp > 1:
            import datetime

            from lctrain.parallel import init_sp_groups
            self.sp_groups = init_sp_groups(layout.sp, timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s))
        # (token id, block size) when the model has landmark layers; landmarks are inserted before sharding
        self.landmarks = landmark_layout(cfg)

    def _shard(self, batch: dict) -> tuple[dict, object]:
        from lctrain.parallel import shard_batch
        tensors = {k: v for k, v in batch.items() if k != "cu_seqlens"}  # boundaries are re-derived per shard
        return shard_batch(tensors, self.sp_groups.sp_rank, self.sp_groups.sp_size, layout=self.cfg.parallel.layout,
                           groups=self.sp_groups, attention_mode=self.cfg.parallel.attn)

    def local_targets(self, batch: dict) -> int:
        """Target tokens this rank's loss will cover."""
        if self.sp_groups is None:
            return int((batch["labels"] != -100).sum())
        local, _ = self._shard(batch)
        return int((local["labels"] != -100).sum())

    def prepare(self, batch: dict) -> tuple[dict, BatchContext]:
        device = self.env.device
        if self.landmarks is not None:  # landmarks add no targets, so local_targets needs no change
            batch = insert_landmarks(batch, *self.landmarks)
        host_positions = batch["position_ids"]  # the loader's CPU tensor: boundaries are computed from it
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()
                 if torch.is_tensor(v) and k != "cu_seqlens"}
        if self.sp_groups is None:
            return batch, BatchContext.from_positions(batch["position_ids"], host_positions=host_positions)
        local, placement = self._shard(batch)
        return local, BatchContext.from_positions(local["position_ids"], sp=placement)

    def comm_stats(self) -> dict:
        if self.sp_groups is None:
            return {}
        from lctrain.parallel import comm_stats
        return comm_stats()
