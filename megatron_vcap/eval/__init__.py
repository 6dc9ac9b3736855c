"""DREAM-1K, VDC and CAREBENCH metrics and the evaluation runner."""
