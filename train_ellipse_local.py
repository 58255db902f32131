"""Train EllipseRegressionNet, which regresses the pupil ellipse (cx, cy, rx, ry), on this machine.

Saves, in --output-dir: best_ellipse_model.pt (best validation mIoU of the drawn axis-aligned
ellipse with the pupil mask: the mean of background and pupil IoU), ellipse_model_epoch_{n}.pt
every 10 epochs and at the final epoch, last_ellipse_model.pt (for --resume),
best_ellipse_model.onnx, args_ellipse_model.json, metrics_ellipse_model.csv/json,
training_curves_ellipse_model.png, and predictions_ellipse_model_epoch_{n}.png (validation frames
with the true pupil and the predicted ellipse) every 5 epochs and at the last one.

Examples:
    python train_ellipse_local.py --demo
    python train_ellipse_local.py --epochs 50 --device cuda --batch-size 64
"""

from common.cli import report_errors, training_parser
from common.specs import ELLIPSE as SPEC
from common.train.engine import fit


def get_args_parser(add_help: bool = True):
    return training_parser(__doc__.splitlines()[0], add_help=add_help)


@report_errors
def main(args):
    return fit(args, SPEC)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
