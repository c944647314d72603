"""BFCL's categories and record conventions: what both the evaluation (bfcl.py) and its report (report.py) read."""

# BFCL v1 (non-live) and v2 (live) single-turn categories, in the seed table's order.
NON_LIVE = ("simple_python", "multiple", "parallel", "parallel_multiple")
LIVE = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
RELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance", "live_relevance")
CATEGORIES = (
    "simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance",
    "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
    "live_irrelevance", "live_relevance",
)
# Categories whose right answer is at least one call (the valid-call rate is taken over these).
CALL_CATEGORIES = NON_LIVE + LIVE + ("live_relevance",)


# How BFCL's generation step records an entry whose inference failed.
INFERENCE_ERROR_PREFIX = "Error during inference: "
