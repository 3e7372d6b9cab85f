"""## Session time budget: a submission is written before the session ends

A Kaggle session ends at 12 hours and takes `/kaggle/working` with it, so a run that trains too long
ends with nothing. With `time_budget_hours` (the Kaggle profile: 11.5) the run keeps a clock from its
start: a fold's training stops early, keeping its best adapter so far, when the time left would not
cover that fold's prediction passes (estimated from its own training speed) plus a margin for the
ensemble and the submission; a fold that has not started when no time is left is skipped, once at least
one fold has predictions. Progress lines show the elapsed time, the budget and an estimate of the end.
"""

import dataclasses
import time

# Scoring one view costs about a third of training one sample (a forward pass against forward,
# recomputation and backward); measured 3-4x in BENCHMARKS.md (test TTA vs training rows/s).
PREDICT_COST_PER_TRAIN_SAMPLE = 1 / 3
MARGIN_S = 300  # ensemble, submission, metrics, plots, and a model load


@dataclasses.dataclass
class RunClock:
    started: float  # time.time() when the run started
    budget_s: float = 0.0  # 0: no budget

    @classmethod
    def start(cls, hours):
        return cls(time.time(), hours * 3600.0)

    def elapsed(self):
        return time.time() - self.started

    def left(self):
        return float("inf") if not self.budget_s else self.budget_s - self.elapsed()

    def out_of_time(self, reserve_s=0.0):
        """Whether the work still reserved (plus the margin) no longer fits in the budget."""
        return bool(self.budget_s) and self.left() < reserve_s + MARGIN_S

    def out_of_time_for(self, views_to_score, train_s_per_sample):
        """Whether a fold's prediction passes (from its training speed) no longer fit, with the margin."""
        return self.out_of_time(prediction_reserve_s(views_to_score, train_s_per_sample))

    def describe(self):
        budget = f" of the {self.budget_s / 3600:.2f} h budget" if self.budget_s else ""
        return f"{self.elapsed() / 3600:.2f} h elapsed{budget}"


def prediction_reserve_s(views_to_score, train_s_per_sample):
    """Seconds the fold's prediction passes need, from its training speed."""
    return views_to_score * train_s_per_sample * PREDICT_COST_PER_TRAIN_SAMPLE
