"""DeepSeek-V3 model family: MLA, DeepSeekMoE with auxiliary-loss-free balancing, multi-token prediction."""
from framework.models.deepseek_v3.model import Block, DeepSeekV3, count_parameters, is_moe_layer

__all__ = ["DeepSeekV3", "Block", "count_parameters", "is_moe_layer"]
