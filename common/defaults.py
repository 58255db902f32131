"""Defaults shared by the parsers and the library; no imports, so parsing stays light."""

DEFAULT_DATA_DIR = "~/.cache/openeds"  # Hub and demo data cache
DEFAULT_HF_REPO = "Conner/sddec25-01"  # the published dataset
SHALLOWNET_HF_REPO = "Conner/openeds-precomputed"  # the older dataset the original ShallowNet trains on
DEMO_SAMPLES = 300
DEMO_SEED = 0
