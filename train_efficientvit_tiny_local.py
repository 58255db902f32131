"""Train TinyEfficientViT-Micro (< 10k parameters) for pupil segmentation on this machine.

Saves, in --output-dir: best_efficientvit_tiny_model.pt (best validation mIoU),
efficientvit_tiny_model_epoch_{n}.pt on every improvement, last_efficientvit_tiny_model.pt (for
--resume), best_efficientvit_tiny_model.onnx, args_efficientvit_tiny_model.json,
metrics_efficientvit_tiny_model.csv/json, training_curves_efficientvit_tiny_model.png, and
predictions_efficientvit_tiny_model_epoch_{n}.png (validation frames with the true and predicted
pupil) every 5 epochs and at the last one. No file name collides with train_efficientvit_local.py's,
so both can share an output folder.

Examples:
    python train_efficientvit_tiny_local.py --demo
    python train_efficientvit_tiny_local.py --epochs 20 --device cuda --batch-size 32
"""

from common.cli import report_errors, training_parser
from common.specs import EFFICIENTVIT_TINY as SPEC
from common.train.engine import fit


def get_args_parser(add_help: bool = True):
    return training_parser(__doc__.splitlines()[0], add_help=add_help)


@report_errors
def main(args):
    return fit(args, SPEC)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
