"""The process and its machine: rank, world size, local rank, device and backend (`dist`), the precision /
channels_last policy (`precision`), atomic file writes (`atomic`) and run provenance (`provenance`).

Every other package asks these modules, never the environment, so each fact has one home."""

from logitcache.runtime.atomic import write_atomic
from logitcache.runtime.dist import DistEnv, current_env, init_distributed, rank_and_world
from logitcache.runtime.provenance import provenance, utc_now

__all__ = ["DistEnv", "current_env", "init_distributed", "provenance", "rank_and_world", "utc_now", "write_atomic"]
