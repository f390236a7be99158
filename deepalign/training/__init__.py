"""Training losses and recipes (SFT, DA, PRESTO, token-wise constrained) and the trainer."""

from deepalign.training.augmentation import SafetyExample, SafetyRecoveryAugmenter, UtilityExample
from deepalign.training.recipes import RECIPES, ConstrainedRecipe, DARecipe, SFTRecipe
from deepalign.training.trainer import Trainer, TrainerConfig

__all__ = ["RECIPES", "ConstrainedRecipe", "DARecipe", "SFTRecipe", "SafetyExample", "SafetyRecoveryAugmenter",
           "Trainer", "TrainerConfig", "UtilityExample"]
