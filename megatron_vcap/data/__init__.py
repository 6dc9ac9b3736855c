"""Video data pipeline: decoding, frame sampling, Qwen-VL preprocessing, manifests, loader."""
