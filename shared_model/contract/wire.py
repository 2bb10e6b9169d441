"""Every key that crosses the network, in one place.

Record names, config keys and metric names shared by the ServerApp and the ClientApp.
They meet only through Flower messages, so this module (plain strings, no flwr) is the
contract between them; it also holds the one table of site error codes a reply may carry
and the sentence the server shows for each.
"""

from __future__ import annotations

# record names inside a Message's RecordDict
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
EVALUATION = "evaluation"  # in a train reply: the evaluation metrics of the incoming model
# on the wire only: ARRAYS packed into one array (`shared_model/contract/packing.py`), its layout
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
# the node's own compute time for this message: only in a reply whose every part is a
# non-private release already (dp=false training, exact evaluation), never under DP
M_SECONDS = "seconds"
M_UNIT_WEIGHT = "unit-weight"  # always 1: the equal weights client-level DP averages with
M_CENTRAL_EPSILON = "central-epsilon"  # the federation's client-level epsilon so far
M_TRAIN_LOSS = "train-loss"
M_EPSILON = "epsilon"
M_DELTA = "delta"
M_BUDGET_LEFT = "epsilon-left"
M_BUDGET_SPENT = "budget-exhausted"  # 1.0 when the site refused to train this round
M_DATA_ERROR = "data-error"  # 1.0 when the node could not take part (SITE_ERROR says why)
M_REFUSED = "refused"  # 1.0 when the node refused what the message asked (its policy)
M_EVAL_EPSILON = "eval-epsilon"  # the site's cumulative epsilon on its val/test splits
M_PRIVATE_METRICS = "private-metrics"  # 1.0 when the metrics are a DP release (noised)
M_LOSS = "loss"
M_ACCURACY = "accuracy"
M_MACRO_F1 = "macro-f1"
M_AUROC = "auroc"
# one-vs-rest AUROC of one label: this prefix + the label's name ("auroc-normal"), one key
# per label of the run's label set (exact evaluation only)
M_AUROC_LABEL_PREFIX = "auroc-"
M_IOU = "iou"
M_BLEU4 = "bleu4"
M_ROUGE_L = "rouge-l"
M_EMPTY_REPORTS = "empty-reports"  # share of generated reports with no word
M_BOX_RATE_NORMAL = "box-rate-normal"  # share of lesion-free cases given a box
M_POINTING = "pointing"  # share of lesion cases whose attention peak is in the true box
M_MAP40 = "map40"  # detection mAP at IoU >= 0.4 (one detection per case)
M_IOU_MEANBOX = "iou-meanbox"  # IoU of the baseline: the predicted class's mean true box
M_CE_PRECISION = "ce-precision"  # clinical efficacy: labeller's reading vs true label
M_CE_RECALL = "ce-recall"
M_CE_F1 = "ce-f1"
M_DISTINCT_REPORTS = "distinct-reports"  # share of distinct generated reports
M_FINDING_AGREEMENT = "finding-agreement"  # report's finding == the classifier's class
M_BLEU1 = "bleu1"
M_CONST_BLEU4 = "const-bleu4"  # BLEU-4 of the best constant training report
M_CONST_ROUGE_L = "const-rouge-l"  # ROUGE-L of the best constant training report

# ConfigRecord in replies: who answered and why a reply carries no update. Every reply's
# SITE record holds SITE_NAME, SITE_ERROR and SITE_DETAIL ("" when there is nothing to say)
SITE = "site"
SITE_NAME = "site-name"
SITE_ERROR = "error"  # "" or one code of SITE_ERRORS, never the node's own text
SITE_DETAIL = "detail"  # "" or, for a code in DETAILED_ERRORS, what the node says about it
# a train reply asked to evaluate first that carries no evaluation: why (a code), and detail
SITE_EVALUATION_ERROR = "evaluation-error"
SITE_EVALUATION_DETAIL = "evaluation-detail"
SITE_UPDATE = "update"  # what the train reply's arrays are: "" weights, "delta-float16"...

# SITE_ERROR codes. A node's own error text can quote its data (row counts, case ids, its
# folder), so only a code crosses the network; the full text stays in the node's log.
ERR_NODE_CONFIG = "node-config"
ERR_CONFIG = "config"
ERR_DEVICE = "device"
ERR_DATA_UNREADABLE = "data-unreadable"
ERR_NO_TRAINING_ROWS = "no-training-rows"
ERR_NO_EVALUATION_ROWS = "no-evaluation-rows"
ERR_LEDGER = "ledger"
ERR_BUDGET_SPENT = "budget-spent"
ERR_EVALUATION_BUDGET_SPENT = "evaluation-budget-spent"
ERR_POLICY = "policy"
ERR_DP_SETUP = "dp-setup"
ERR_NON_FINITE_UPDATE = "non-finite-update"
ERR_INTERNAL = "internal"

# the one sentence the server shows for each code
SITE_ERRORS: dict[str, str] = {
    ERR_NODE_CONFIG: "the node cannot use its own node config (its log names the key)",
    ERR_CONFIG: "the node cannot use the run config or the round config it was sent",
    ERR_DEVICE: "the node cannot use the device its node config names",
    ERR_DATA_UNREADABLE: "the node's data cannot be opened (its log names the problem)",
    ERR_NO_TRAINING_ROWS: "the node's data holds no usable training rows",
    ERR_NO_EVALUATION_ROWS: "the node's data holds no rows in the split asked to evaluate",
    ERR_LEDGER: "the node's privacy ledger cannot be read or trusted: it takes no part "
                "until the ledger is restored",
    ERR_BUDGET_SPENT: "the node's training privacy budget does not allow this round",
    ERR_EVALUATION_BUDGET_SPENT: "the node's evaluation privacy budget does not allow this "
                                 "release",
    ERR_POLICY: "the node's policy does not accept what the message asks",
    ERR_DP_SETUP: "the node cannot train privately as the run asks",
    ERR_NON_FINITE_UPDATE: "the noised update was not finite: the round is charged to the "
                           "node's budget and nothing was sent",
    ERR_INTERNAL: "the node failed while handling the message (its log holds the error)",
}

# The codes whose SITE_DETAIL may be non-empty: their text is computed only from the node's
# config, the server's run and round config and the privacy ledger's figures (themselves
# post-processing of DP releases), never from the data. The server shows no other detail.
DETAILED_ERRORS: frozenset[str] = frozenset(
    {ERR_CONFIG, ERR_POLICY, ERR_BUDGET_SPENT, ERR_EVALUATION_BUDGET_SPENT})

MAX_DETAIL = 500  # characters of SITE_DETAIL the server shows


def site_error_text(code: str, detail: str = "") -> str:
    """What the server shows for a reply's site error: the code's sentence, then the node's
    detail where the code may carry one. A value outside the table (an older node, a
    faulty one) is shown as what it is, cut short: the server never trusts it to be a
    code."""
    if not code:
        return ""
    sentence = SITE_ERRORS.get(code)
    if sentence is None:
        return f"unknown site error code {code[:80]!r}"
    if detail and code in DETAILED_ERRORS:
        cut = detail if len(detail) <= MAX_DETAIL else detail[:MAX_DETAIL] + "..."
        return f"{sentence} ({code}): {cut}"
    return f"{sentence} ({code})"
