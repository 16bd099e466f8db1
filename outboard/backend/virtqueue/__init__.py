"""Virtqueues: the device side of the split ring, and descriptor chains."""

from .chain import Chain
from .split import MAX_QUEUE_SIZE, SplitQueue, need_event

__all__ = ["MAX_QUEUE_SIZE", "Chain", "SplitQueue", "need_event"]
