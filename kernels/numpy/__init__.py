"""The vectorised NumPy reference backend; in float64 it is the oracle of every other."""

from .matching import match_at, match_switch_pool
from .rendering import render, unpool
from .statistics import template_stats

__all__ = ["match_switch_pool", "match_at", "unpool", "render", "template_stats"]
