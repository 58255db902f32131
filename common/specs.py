"""The project's defaults and what each training script trains and how it names its files.

Plain data with no imports beyond the standard library: the Modal launchers and the parsers read
these on machines without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SIZE = (400, 640)  # (H, W) of OpenEDS frames
SIZE_MULTIPLE = 16  # the segmentation models' stride: trainable frames have H and W divisible by it
DEFAULT_DATA_DIR = "~/.cache/openeds"  # Hub and demo data cache
DEFAULT_HF_REPO = "Conner/sddec25-01"  # the published dataset
SHALLOWNET_HF_REPO = "Conner/openeds-precomputed"  # the older dataset the original ShallowNet trains on
DEMO_SAMPLES = 300
DEMO_SEED = 0
# families of the domain-randomized synthetic generator: disjoint rendering parameters (prep/synthetic.py)
SYNTHETIC_FAMILIES = ("train", "heldout")
# Train-split augmentation groups (common.train.augment): --augment takes a comma list of these,
# "all" (every group) or "none". The default stays today's until a benchmark measures the others.
AUGMENT_GROUPS = ("original", "photometric", "geometric", "occluders")
# The training recipe's defaults, one line each: benchmarks/bench_transfer.py measures the choices
# (README, "Transfer to new people and cameras").
DEFAULT_AUGMENT = "original"
DEFAULT_EPOCHS = 10
# decay of the weights' moving average (--ema); 0 trains and validates the weights as they are
DEFAULT_EMA = 0.0
DEFAULT_ALPHA_FLOOR = 0.2  # segmentation loss: the lowest weight of Dice against the surface term


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


# model, MLflow model_type and architecture tags, file stem, per-epoch checkpoint name, when it is written
EFFICIENTVIT = TrainSpec("efficientvit", "TinyEfficientViT",
                         "EfficientViT-MSRA cascaded group attention, 3 stages, skip decoder",
                         "efficientvit_model",
                         "efficientvit_model_epoch_{epoch}_miou_{metric:.4f}.pt", "on_improve")
EFFICIENTVIT_TINY = TrainSpec("efficientvit_micro", "TinyEfficientViT-Micro",
                              "EfficientViT-MSRA micro: embed (8,12,18), decoder 8, heads (1,1,1)",
                              "efficientvit_tiny_model", "efficientvit_tiny_model_epoch_{epoch}.pt",
                              "on_improve")
ELLIPSE = TrainSpec("ellipse", "EllipseRegression",
                    "CNN encoder + global pool + sigmoid head (cx, cy, rx, ry)",
                    "ellipse_model", "ellipse_model_epoch_{epoch}.pt", "every_10")
SHALLOWNET = TrainSpec("shallownet", "ShallowNet",
                       "dense U-Net: 5 densely connected encoder blocks, 4 decoder blocks, separable convs",
                       "shallow_model", "shallow_model_epoch_{epoch}.pt", "every_10")
SPECS = {spec.model_name: spec for spec in (EFFICIENTVIT, EFFICIENTVIT_TINY, ELLIPSE, SHALLOWNET)}
