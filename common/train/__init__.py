"""Training: the engine and its parts (runtime, data, augmentation, losses, metrics, tasks, run
files, MLflow tracking, torchrun)."""
