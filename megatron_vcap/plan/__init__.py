"""The planner (``vcap plan``): per-GPU memory, FLOPs and step time of a job at each TP/PP/DP
layout that a cluster shape allows, before anyone queues for GPUs. ``vcap train --check``
prints its verdict for the config's own layout."""
