"""The train stage: SFT data, objectives, strategies (ddp, fsdp, deepspeed), the Ray Train loop.

Import submodules directly; this package imports nothing so unit tests stay free of Ray.
"""
