"""Train TinyEfficientViTSeg (< 60k parameters) for pupil segmentation on this machine.

Saves, in --output-dir: best_efficientvit_model.pt (best validation mIoU, the mean of background
and pupil IoU), an efficientvit_model_epoch_{n}_miou_{miou}.pt on every improvement,
last_efficientvit_model.pt (for --resume), best_efficientvit_model.onnx, args_efficientvit_model.json,
metrics_efficientvit_model.csv/json, training_curves_efficientvit_model.png, and
predictions_efficientvit_model_epoch_{n}.png (validation frames with the true and predicted pupil)
every 5 epochs and at the last one.
MLflow logging is on when MLFLOW_TRACKING_URI is set.

Examples:
    python train_efficientvit_local.py --demo                       # embedded synthetic data
    python train_efficientvit_local.py --epochs 10 --device cuda     # Conner/sddec25-01 from the Hub
    python train_efficientvit_local.py --dataset ./precompute_output --epochs 30
    python train_efficientvit_local.py --demo --resume checkpoints/last_efficientvit_model.pt
"""

from common.cli import report_errors, training_parser
from common.specs import EFFICIENTVIT as SPEC
from common.train.engine import fit


def get_args_parser(add_help: bool = True):
    return training_parser(__doc__.splitlines()[0], add_help=add_help)


@report_errors
def main(args):
    return fit(args, SPEC)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
