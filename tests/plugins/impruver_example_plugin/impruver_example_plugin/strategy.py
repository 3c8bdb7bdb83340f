"""A distribution strategy from a plugin: data parallel with a static graph and small gradient buckets.

``hardware.distributed=ddp_static`` (entry point ``impruver_strategies``). A static graph lets DDP skip the
per-step search for unused parameters and overlap the reduction of each bucket with the backward pass; 1 MiB
buckets start that reduction sooner on a small model. Everything else (launch, checkpoints, saving) is the
built-in data-parallel behaviour it extends; the plugin checks that DDP really got its settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from impruver.errors import RunError
from impruver.strategies import DataParallel

BUCKET_MB = 1


@dataclass(frozen=True)
class StaticGraphDDP(DataParallel):
    """DDP with ``static_graph=True`` and ``bucket_cap_mb`` small buckets."""

    def prepare(self, accelerator: Any, model: Any, optimizer: Any) -> tuple[Any, Any]:
        model, optimizer = super().prepare(accelerator, model, optimizer)
        from torch.nn.parallel import DistributedDataParallel

        wrapped = isinstance(model, DistributedDataParallel)  # one process: nothing is wrapped, nothing to check
        if wrapped and (not model.static_graph or model.bucket_bytes_cap != BUCKET_MB * 1024 * 1024):
            raise RunError(f"{self.name}: DDP was built without this strategy's settings "
                           f"(static_graph={model.static_graph}, bucket_bytes_cap={model.bucket_bytes_cap})")
        return model, optimizer


ddp_static = StaticGraphDDP("ddp_static", ddp_kwargs={"static_graph": True, "bucket_cap_mb": BUCKET_MB})
