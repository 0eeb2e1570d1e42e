"""Names of the records and config keys that travel in Flower messages (one place, constants)."""

# RecordDict keys
ARRAYS = "arrays"  # ArrayRecord: the global adapter (down) or the site's adapter delta (up)
CONFIG = "config"  # ConfigRecord: the round's plan (down)
METRICS = "metrics"  # MetricRecord: numbers about the round (up)
SITE = "site"  # ConfigRecord: who answered (up)

# ConfigRecord keys, coordinator -> site
SERVER_ROUND = "server-round"  # injected by Flower's FedAvg
ROUND_SEED = "fedsecure.round-seed"

# MetricRecord keys, site -> coordinator
NUM_EXAMPLES = "num-examples"  # FedAvg weight: records in the site's training set
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
EVAL_TOKENS = "eval-tokens"
STEPS = "steps"
SECONDS = "seconds"

# ConfigRecord keys, site -> coordinator
SITE_NAME = "name"
DATASET_FINGERPRINT = "dataset-fingerprint"

# node_config keys
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
NODE_SITE_NAME = "site-name"
NODE_DATA_DIR = "data-dir"
