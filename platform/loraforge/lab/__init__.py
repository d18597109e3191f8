"""The lab: a seeded synthetic world, its tasks and a tiny pretrained Llama, built once and cached."""

from loraforge.lab.build import LabPaths, ensure_lab

__all__ = ["LabPaths", "ensure_lab"]
