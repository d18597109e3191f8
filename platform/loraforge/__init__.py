"""loraforge: curate, fine-tune, evaluate and serve LoRA adapters on Ray."""

__version__ = "0.1.0"
