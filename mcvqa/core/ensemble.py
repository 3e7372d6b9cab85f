"""## Ensemble: the folds' probabilities averaged, the letters picked

Each fold's test probabilities (already averaged over its option-order views, core/inference.py) are
averaged in probability across folds: equal weights, or weighted by out-of-fold accuracy; optionally
after one temperature fitted on the out-of-fold rows. The letters are the argmax, in the original
option order.
"""

import numpy as np
from scipy.optimize import minimize_scalar

from .config import ConfigError
from .inference import softmax


def fold_weights(cfg, oof_accuracies):
    if cfg.ensemble_weights == "equal":
        return np.full(len(oof_accuracies), 1.0 / len(oof_accuracies))
    if cfg.ensemble_weights == "oof_acc":
        acc = np.asarray(oof_accuracies, dtype=float)
        return acc / acc.sum()
    raise ConfigError(f"config: ensemble_weights must be 'equal' or 'oof_acc', got {cfg.ensemble_weights!r}")


def ensemble_folds(fold_probs, weights):
    """Weighted probability average across folds."""
    return np.tensordot(np.asarray(weights, dtype=float), np.stack(fold_probs), axes=1)


def fit_temperature(probs, targets):
    """One temperature T minimising the log-loss of softmax(log p / T) on out-of-fold rows."""
    logp = np.log(np.clip(probs, 1e-12, None))
    targets = np.asarray(targets)

    def nll(t):
        scaled = softmax(logp / t)
        return -np.log(np.clip(scaled[np.arange(len(targets)), targets], 1e-12, None)).mean()

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


def apply_temperature(probs, temperature):
    return softmax(np.log(np.clip(probs, 1e-12, None)) / temperature)
