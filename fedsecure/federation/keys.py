"""Names of the records and config keys that travel in Flower messages (one place, constants)."""

# RecordDict keys
ARRAYS = "arrays"  # ArrayRecord: the global adapter (down) or the site's adapter delta (up)
CONFIG = "config"  # ConfigRecord: the round's plan (down)
METRICS = "metrics"  # MetricRecord: numbers about the round (up)
SITE = "site"  # ConfigRecord: who answered (up)

# ConfigRecord keys, coordinator -> site
SERVER_ROUND = "server-round"  # injected by Flower's FedAvg
DOWNLINK = "fedsecure.downlink"  # bytes: the encoded global adapter (transport on)
DOWNLINK_BASE = "fedsecure.downlink-base"  # hash of the adapter the payload applies to, or "none"
ATTEST_NONCE = "fedsecure.attest-nonce"  # bytes: this round's challenge, issued to this node only

# site -> coordinator, transport on: RecordDict key UPDATE -> ConfigRecord {PAYLOAD: bytes}
UPDATE = "update"
PAYLOAD = "payload"
ROUND_SEED = "fedsecure.round-seed"

# site -> coordinator, attestation on: RecordDict key ATTESTATION -> ConfigRecord with the fields of
# fedsecure.attestation.protocol.FIELDS (nonce, node-key, dp-config, code-hash, evidence, update-signature)
ATTESTATION = "attestation"

# MetricRecord keys, site -> coordinator
NUM_EXAMPLES = "num-examples"  # FedAvg weight: records in the site's training set
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
EVAL_TOKENS = "eval-tokens"
STEPS = "steps"
SECONDS = "seconds"

# MetricRecord keys, site -> coordinator, when DP is on (all sites send the same keys)
DP_EPSILON = "dp.epsilon"  # spent on this dataset after this round, all runs
DP_EPSILON_BUDGET = "dp.epsilon-budget"
DP_DELTA = "dp.delta"
DP_SIGMA = "dp.sigma"
DP_Q = "dp.q"
DP_STEPS = "dp.steps"  # DP-SGD steps of this round
DP_MAX_GRAD_NORM = "dp.max-grad-norm"
DP_EPSILON_IF_TRAINED = "dp.epsilon-if-trained"  # budget-exhausted replies: epsilon the round would have reached

# ConfigRecord PRIVACY, site -> coordinator
PRIVACY = "privacy"
STATUS = "status"  # "trained" | "budget-exhausted" | "refused" | "non-private"
ACCOUNTANT = "accountant"
LEDGER_HEAD = "ledger-head"
LEDGER_ENTRIES = "ledger-entries"
REASON = "reason"
STATUS_TRAINED = "trained"
STATUS_EXHAUSTED = "budget-exhausted"
STATUS_NON_PRIVATE = "non-private"
STATUS_REFUSED = "refused"  # the run asked for more than the site's own policy allows (or replayed a round)

# ConfigRecord keys, site -> coordinator
SITE_NAME = "name"
DATASET_FINGERPRINT = "dataset-fingerprint"

# node_config keys. A site's own settings travel as "site.*" keys (fedsecure.config.SiteSettings.to_flat),
# written by `fedsecure client` from site.yaml or by the in-process engine; Flower's simulation sets these two:
SITE_PREFIX = "site."  # every key of a site's own settings (SiteSettings.to_flat) starts with this
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
NODE_WORKER_SOCKET = "site.worker_socket"  # the site's warm worker (fedsecure client); absent = handle in-process
# Flower's Ray simulation engine gives its nodes no node config of ours: `fedsecure simulate --engine ray` writes the
# simulated sites' own settings to this file in the run directory, and a simulated node reads them from there
SIMULATED_SITES = "simulated-sites.yaml"

# context.state keys (stay on the node)
STATE_PLAN = "fedsecure.privacy-plan"
STATE_VIEW = "fedsecure.adapter-view"  # the global adapter as this site last reconstructed it

# secure aggregation (MessageType.QUERY): ConfigRecord CONFIG holds the phase and its body, both ways
SECAGG_PHASE = "fedsecure.secagg.phase"  # advertise | share | masked | consistency | unmask
SECAGG_BODY = "fedsecure.secagg.body"  # bytes: canonical JSON of the phase's data
SECAGG_VECTOR = "fedsecure.secagg.vector"  # bytes: the site's masked vector (phase "masked", up)
STATE_SECAGG = "fedsecure.secagg-session"  # the site's session between the round's messages (secret; node only)
STATE_SECAGG_DELTA = "fedsecure.secagg-delta"  # the trained update waiting for the round's protocol (node only)
STATE_SECAGG_ROUND = "fedsecure.secagg-round"  # run and round of that update
