"""Rewards for RL on generated images, and the image embedders they (and eval) share."""
from .embedders import ImageEmbedder, PixelStatsEmbedder, VisionTowerEmbedder, as_image_batch, make_embedder
from .rewards import (
    REWARD_REGISTRY,
    AttributeMatchReward,
    CompositeReward,
    DiversityReward,
    FutureInterestReward,
    NoveltyPenalty,
    PreferenceReward,
    Reward,
    RewardContext,
    reward_stats,
)

__all__ = [
    "ImageEmbedder", "PixelStatsEmbedder", "VisionTowerEmbedder", "as_image_batch", "make_embedder",
    "REWARD_REGISTRY", "AttributeMatchReward", "CompositeReward", "DiversityReward", "FutureInterestReward",
    "NoveltyPenalty", "PreferenceReward", "Reward", "RewardContext", "reward_stats",
]
