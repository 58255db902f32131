"""What each training script trains and how it names its files.

Plain data with no heavy imports: the Modal launchers read these on machines without torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainSpec:
    """What a training script trains and how it names its files."""

    model_name: str           # registry name (common.models)
    model_type: str           # MLflow tag model_type
    architecture: str         # MLflow tag architecture
    file_stem: str            # e.g. "efficientvit_tiny_model"
    epoch_pattern: str        # per-epoch checkpoint name; fields: epoch (1-based), metric
    epoch_checkpoint: str     # "on_improve" or "every_10"
    experiment: str = "visionassist"

    @property
    def best_name(self) -> str:
        return f"best_{self.file_stem}.pt"

    @property
    def last_name(self) -> str:
        return f"last_{self.file_stem}.pt"

    @property
    def onnx_name(self) -> str:
        return f"best_{self.file_stem}.onnx"

    # Run files carry the model's stem, so two scripts sharing an --output-dir keep their own.
    @property
    def args_name(self) -> str:
        return f"args_{self.file_stem}.json"

    @property
    def metrics_name(self) -> str:
        """Without extension: the history is written as .json and .csv."""
        return f"metrics_{self.file_stem}"

    @property
    def curves_name(self) -> str:
        return f"training_curves_{self.file_stem}.png"

    def predictions_name(self, epoch: int) -> str:
        return f"predictions_{self.file_stem}_epoch_{epoch}.png"

    def epoch_name(self, epoch: int, metric: float) -> str:
        return self.epoch_pattern.format(epoch=epoch, metric=metric)

    def wants_epoch_checkpoint(self, epoch: int, epochs: int, improved: bool) -> bool:
        if self.epoch_checkpoint == "every_10":
            return epoch % 10 == 0 or epoch == epochs
        return improved


EFFICIENTVIT = TrainSpec(
    model_name="efficientvit",
    model_type="TinyEfficientViT",
    architecture="EfficientViT-MSRA cascaded group attention, 3 stages, skip decoder",
    file_stem="efficientvit_model",
    epoch_pattern="efficientvit_model_epoch_{epoch}_miou_{metric:.4f}.pt",
    epoch_checkpoint="on_improve",
)
EFFICIENTVIT_TINY = TrainSpec(
    model_name="efficientvit_micro",
    model_type="TinyEfficientViT-Micro",
    architecture="EfficientViT-MSRA micro: embed (8,12,18), decoder 8, heads (1,1,1)",
    file_stem="efficientvit_tiny_model",
    epoch_pattern="efficientvit_tiny_model_epoch_{epoch}.pt",
    epoch_checkpoint="on_improve",
)
ELLIPSE = TrainSpec(
    model_name="ellipse",
    model_type="EllipseRegression",
    architecture="CNN encoder + global pool + sigmoid head (cx, cy, rx, ry)",
    file_stem="ellipse_model",
    epoch_pattern="ellipse_model_epoch_{epoch}.pt",
    epoch_checkpoint="every_10",
)
SHALLOWNET = TrainSpec(
    model_name="shallownet",
    model_type="ShallowNet",
    architecture="dense U-Net: 5 densely connected encoder blocks, 4 decoder blocks, separable convs",
    file_stem="shallow_model",
    epoch_pattern="shallow_model_epoch_{epoch}.pt",
    epoch_checkpoint="every_10",
)
SPECS = {spec.model_name: spec for spec in (EFFICIENTVIT, EFFICIENTVIT_TINY, ELLIPSE, SHALLOWNET)}
