"""Process topology, launcher, layer specs, DeepSpeed engines (ZeRO, pipeline) and FP8."""
