"""Building a dataset: preprocessing (the one implementation), raw sources (OpenEDS, your own
folders, synthetic frames), parquet shards, the Hub, and the check of a built dataset."""
