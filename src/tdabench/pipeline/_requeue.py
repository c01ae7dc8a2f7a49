"""The requeue-able shard callable (imports submitit; only the launcher imports this module)."""

from __future__ import annotations

import submitit.helpers

from tdabench.pipeline.launcher import ShardCall

__all__ = ["RequeueableShardCall"]


class RequeueableShardCall(ShardCall, submitit.helpers.Checkpointable):
    """:class:`ShardCall` that SLURM requeues on timeout or preemption.

    submitit calls :meth:`checkpoint` when the task receives the time-limit / preemption signal;
    the inherited implementation resubmits ``self`` with the same shard id. Shards write their
    output atomically, so a requeued shard simply recomputes from the start.
    """
