"""Every key that crosses the network, in one place.

Record names, config keys and metric names shared by the ServerApp and the ClientApp.
They meet only through Flower messages, so this module (plain strings, no flwr) is the
contract between them.
"""

from __future__ import annotations

# record names inside a Message's RecordDict
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
EVALUATION = "evaluation"  # in a train reply: the evaluation metrics of the incoming model
# on the wire only: ARRAYS packed into one array (`shared_model/packing.py`), its layout
PACKED = "packed"  # ArrayRecord holding one array, also named PACKED
PACKED_LAYOUT = "packed-layout"  # ConfigRecord: packing.NAMES, DTYPES, SHAPES

# ConfigRecord keys the server sends with each train/evaluate message
CFG_SERVER_ROUND = "server-round"
CFG_LOCAL_EPOCHS = "local-epochs"
CFG_LR = "lr"
CFG_PROXIMAL_MU = "proximal-mu"
CFG_TOTAL_ROUNDS = "num-server-rounds"
CFG_EVAL_SPLIT = "eval-split"  # "val" or "test": which split the sites evaluate on
# 1 in a train message: evaluate its arrays (the previous round's global model) before
# training, and reply with both (run config evaluate-with-train: one message a round)
CFG_EVALUATE_FIRST = "evaluate-first"
# secure aggregation: the legacy FitIns carries the array names and how to weigh the update
CFG_ARRAY_KEYS = "array-keys"  # the arrays' names in order, comma-joined (legacy has none)
CFG_WEIGHT_KEY = "weight-key"  # the reply metric the mean is weighted by
CFG_MAX_WEIGHT = "max-weight"  # the most examples one update may weigh

# MetricRecord keys in replies
M_NUM_EXAMPLES = "num-examples"
M_SECONDS = "seconds"  # the node's own compute time for this message (released without DP)
M_UNIT_WEIGHT = "unit-weight"  # always 1: the equal weights client-level DP averages with
M_CENTRAL_EPSILON = "central-epsilon"  # the federation's client-level epsilon so far
M_TRAIN_LOSS = "train-loss"
M_EPSILON = "epsilon"
M_DELTA = "delta"
M_BUDGET_LEFT = "epsilon-left"
M_BUDGET_SPENT = "budget-exhausted"  # 1.0 when the site refused to train this round
M_DATA_ERROR = "data-error"  # 1.0 when the site's data could not be opened
M_REFUSED = "refused"  # 1.0 when the node refused what the message asked (its policy)
M_EVAL_EPSILON = "eval-epsilon"  # the site's cumulative epsilon on its val/test splits
M_PRIVATE_METRICS = "private-metrics"  # 1.0 when the metrics are a DP release (noised)
M_LOSS = "loss"
M_ACCURACY = "accuracy"
M_MACRO_F1 = "macro-f1"
M_AUROC = "auroc"
M_IOU = "iou"
M_BLEU4 = "bleu4"
M_ROUGE_L = "rouge-l"
M_EMPTY_REPORTS = "empty-reports"  # share of generated reports with no word

# ConfigRecord in replies: who answered and why a reply carries no update
SITE = "site"
SITE_NAME = "site-name"
SITE_ERROR = "error"
SITE_EVALUATION_ERROR = "evaluation-error"  # why a train reply carries no evaluation
SITE_UPDATE = "update"  # what the train reply's arrays are: "" weights, "delta-float16"...
