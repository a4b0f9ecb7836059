"""Metrics sinks (JSONL, TensorBoard, MLflow) and throughput / MFU."""
