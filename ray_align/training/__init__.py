"""Fine-tuning: the training core (no Ray needed), DeepSpeed configs, and the Ray Train driver."""
