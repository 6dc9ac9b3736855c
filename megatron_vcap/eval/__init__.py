"""All evaluation: held-out rewards (``vcap eval reward``) and the DREAM-1K, VDC and CAREBENCH
protocols."""
