"""Stage 2: training a student — from a cache, online with a teacher, or teacher-free.

    config.py      TrainConfig (validated, JSON round trip) and the learning-rate schedule (a pure function)
    loop.py        train(): the epoch/step loop, on one screen
    sources.py     where each mode's soft labels come from (cache rows, an online teacher, PS-KD, none)
    lockstep.py    DDP lockstep: planned steps, sample-count agreement, frozen BN for repeat batches
    checkpoint.py  weights-only checkpoints and --resume
    rundir.py      the run directory (config.json, metrics.jsonl, checkpoints/)
    pskd_store.py  PS-KD's previous-epoch predictions, in the cache format
"""

from logitcache.train.config import TrainConfig, learning_rate
from logitcache.train.loop import train
from logitcache.train.rundir import RunDir

__all__ = ["RunDir", "TrainConfig", "learning_rate", "train"]
