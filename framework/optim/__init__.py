"""Optimizer state: AdamW with fp32 | bf16 | fp8 moments, FP32 master weights, ZeRO-1 sharding."""
from framework.optim.manager import OptimizerStateManager, adamw_
from framework.optim.state_format import FORMATS, MomentBuffer

__all__ = ["OptimizerStateManager", "adamw_", "FORMATS", "MomentBuffer"]
