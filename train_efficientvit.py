# /// script
# requires-python = ">=3.11"
# dependencies = ["modal==1.6.4"]
# ///
"""Train TinyEfficientViTSeg (< 60k parameters) on a Modal cloud GPU.

The same job as train_efficientvit_local.py (same flags, same engine), run in a Modal container
with the Hub dataset cached on the openeds-dataset-cache volume and the run folder on the
visionassist-runs volume; at the end the run folder is downloaded into --output-dir
(default ./checkpoints/<run-name>). Rerunning a --run-name resumes it from its last_*.pt.

Examples:
    uv run train_efficientvit.py --epochs 30 --batch-size 32
    modal run train_efficientvit.py --gpu A100-80GB --epochs 30 --run-name vit-a100
    modal run --detach train_efficientvit.py --detach --epochs 200   # Modal's --detach goes first
    uv run train_efficientvit.py --gpu H100,A100-80GB --detach --run-name vit-long --epochs 200
    uv run train_efficientvit.py --fetch vit-long   # download a run into checkpoints/
    uv run train_efficientvit.py --run-name vit-long --resume vit-long/last_efficientvit_model.pt
    python train_efficientvit.py --local --demo --epochs 2   # the same job on this machine
"""

import sys

import modal

from common import cloud, cloud_job
from common.cli import report_errors
from common.specs import DEFAULT_HF_REPO
from common.specs import EFFICIENTVIT as SPEC

app = modal.App("visionassist-efficientvit")


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
