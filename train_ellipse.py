# /// script
# requires-python = ">=3.11"
# dependencies = ["modal==1.6.4"]
# ///
"""Train EllipseRegressionNet (pupil ellipse cx, cy, rx, ry) on a Modal cloud GPU.

The same job as train_ellipse_local.py (same flags, same engine), run in a Modal container
with the Hub dataset cached on the openeds-dataset-cache volume and the run folder on the
visionassist-runs volume; at the end the run folder is downloaded into --output-dir
(default ./checkpoints/<run-name>). Rerunning a --run-name resumes it from its last_*.pt.

Examples:
    uv run train_ellipse.py --epochs 30 --batch-size 32
    modal run train_ellipse.py --gpu A100-80GB --epochs 30 --run-name ellipse-a100
    modal run --detach train_ellipse.py --detach --epochs 200   # Modal's --detach goes first
    uv run train_ellipse.py --gpu H100,A100-80GB --detach --run-name ellipse-long --epochs 200
    uv run train_ellipse.py --fetch ellipse-long   # download a run into checkpoints/
    uv run train_ellipse.py --run-name ellipse-long --resume ellipse-long/last_ellipse_model.pt
    python train_ellipse.py --local --demo --epochs 2   # the same job on this machine
"""

import sys

import modal

from common import cloud, cloud_job
from common.cli import report_errors
from common.specs import DEFAULT_HF_REPO
from common.specs import ELLIPSE as SPEC

app = modal.App("visionassist-ellipse")


@app.function(**cloud.function_options(sys.argv))
def train_remote(config: dict) -> dict:
    return cloud_job.remote_job(SPEC, config)


def get_args_parser(add_help: bool = True):
    return cloud.modal_parser(__doc__.splitlines()[0], DEFAULT_HF_REPO, add_help=add_help)


@report_errors
def main(args):
    return cloud.launch(args, SPEC, train_remote, app)


@app.local_entrypoint()
def modal_main(*argv: str):
    main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
