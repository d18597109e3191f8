"""Ray Tune search over LoRA rank, alpha and learning rate; each trial fits its own TorchTrainer."""
