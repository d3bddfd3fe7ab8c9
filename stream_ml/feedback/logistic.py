"""The online logistic model: a standard scaler + river's LogisticRegression, exportable and servable.

The scaler is river's ``StandardScaler`` learning on arrays (:class:`RunningScaler`: the same
numbers; it learns four times faster).

It learns one labelled payment at a time from the vector the scorer served (the scorer's rule for
missing values, :func:`~stream_ml.serving.model.model_input`, applied first), and its whole state
(scaler counts, means and variances, weights, intercept, class counts, optimizer steps) goes into
one safetensors file: :meth:`OnlineLogistic.to_tensors` is both the learner's checkpoint and a
model the scorer loads as architecture ``online-logistic`` (``serving/model.py``).

Class imbalance. Fraud is under 1 % of payments; a plain SGD logistic model then mostly learns
the prior. Positives are weighted by √(negatives / positives), from running counts (the trainer's
rule for its ``pos_weight``). Weighting positives by w multiplies the odds the model converges to
by w, so :meth:`OnlineLogistic.predict_proba_one` divides the odds by the current w: scores are
probabilities again (approximately: w moves as the counts do, and SGD on a moving stream is never
quite at its optimum), so the review threshold means what it says. The correction is monotone, so
rankings (ROC and PR AUC) do not depend on it.

>>> import random
>>> names = ["amount", "count_1h"]
>>> model = OnlineLogistic(names)
>>> rng = random.Random(0)
>>> for _ in range(5000):
...     fraud = rng.random() < 0.02
...     model.learn_one([rng.gauss(3.0 if fraud else 0.0, 1.0), float("nan")], fraud)
>>> model.predict_proba_one([4.0, 0.0]) > 0.5 > model.predict_proba_one([0.0, 0.0])
True
>>> weights, architecture = model.to_tensors()
>>> again = OnlineLogistic.from_tensors(weights, architecture, names)
>>> again.predict_proba_one([1.0, 2.0]) == model.predict_proba_one([1.0, 2.0])
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from river import linear_model, optim

from stream_ml.serving.model import ONLINE_LOGISTIC, OnlineLogisticModule, model_input


def model_rows(vectors: Sequence[Sequence[float]], names: Sequence[str]) -> np.ndarray:
    """Served vectors as the rows the online models learn (float64), after the scorer's rule for
    missing values: ``model_input``'s float32 values, exactly, in the names' order."""
    if not len(vectors):
        return np.zeros((0, len(names)))
    rows = model_input(vectors)
    if rows.ndim != 2 or rows.shape[1] != len(names):
        raise ValueError(f"expected vectors of {len(names)} values, got an array of shape {rows.shape}")
    return rows.astype(np.float64)


def rows_as_dicts(rows: np.ndarray, names: Sequence[str]) -> list[dict[str, float]]:
    """Rows of :func:`model_rows` as river's dicts (the same numbers)."""
    return [dict(zip(names, row, strict=True)) for row in rows.tolist()]


def as_river_inputs(vectors: Sequence[Sequence[float]], names: Sequence[str]) -> list[dict[str, float]]:
    """Served vectors as river's dicts, after the scorer's rule for missing values.

    Converting a batch at once is what makes it cheap; the dicts are shared by the online models
    (none of them changes its input).
    """
    return rows_as_dicts(model_rows(vectors, names), names)


class RunningScaler:
    """river's ``StandardScaler`` (running mean and population variance, Welford), learning on arrays.

    river updates its statistics one feature at a time in Python: nearly a third of the online
    learners' time. Here they are float64 arrays in the names' order, updated with the same
    operations in the same order (IEEE arithmetic is the same in numpy): river's numbers, bit for bit
    (the tests compare them on a stream). Standardising stays river's loop over the input dict,
    on lists of the statistics: with its 0 for a feature that has not varied, that is faster in
    Python than in numpy for one row. Inputs are whole: every feature, in the names' order.

    >>> s = RunningScaler(2)
    >>> for row in ([1.0, 0.0], [3.0, 0.0]):
    ...     s.learn(np.array(row))
    >>> s.means.tolist(), s.vars.tolist(), s.transform_one({"a": 4.0, "b": 5.0})
    ([2.0, 0.0], [1.0, 0.0], {'a': 2.0, 'b': 0.0})
    """

    def __init__(self, n_inputs: int) -> None:
        self.counts = np.zeros(n_inputs)  # float64: exact up to 2**53, and divided by as river does
        self.means = np.zeros(n_inputs)
        self.vars = np.zeros(n_inputs)

    @classmethod
    def from_state(
        cls, counts: Sequence[int], means: Sequence[float], variances: Sequence[float]
    ) -> RunningScaler:
        new = cls(len(counts))
        new.counts[:], new.means[:], new.vars[:] = counts, means, variances
        return new

    def learn(self, row: np.ndarray) -> None:
        """river's ``learn_one``: count, then mean, then variance (with the new mean)."""
        self.counts += 1.0
        delta = row - self.means
        self.means += delta / self.counts
        self.vars += (delta * (row - self.means) - self.vars) / self.counts

    def transform_one(self, x: dict[str, float]) -> dict[str, float]:
        """river's ``transform_one`` of a dict holding every feature in order: (x − mean) / √var,
        0 where the variance is 0."""
        means, variances = self.means.tolist(), self.vars.tolist()
        return {
            name: (xi - m) / v**0.5 if v else 0.0
            for (name, xi), m, v in zip(x.items(), means, variances, strict=True)
        }


def positive_weight(positives: int, negatives: int) -> float:
    """√(negatives / positives), each count at least 1: 1 before any label."""
    return math.sqrt(max(negatives, 1) / max(positives, 1))


class OnlineLogistic:
    """A standardised logistic regression learnt by plain SGD, one example at a time.

    ``lr`` is the weights' learning rate, ``intercept_lr`` the intercept's, ``l2`` a ridge
    penalty; ``weight_positives`` turns the √(neg/pos) weighting (and its calibration correction)
    on. Plain SGD keeps no state beyond its step count, so the whole model is a few tensors.
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        lr: float = 0.01,
        intercept_lr: float = 0.01,
        l2: float = 0.0,
        weight_positives: bool = True,
    ) -> None:
        self.names = list(names)
        self.lr, self.intercept_lr, self.l2 = float(lr), float(intercept_lr), float(l2)
        self.weight_positives = bool(weight_positives)
        self.scaler = RunningScaler(len(self.names))
        self.model = linear_model.LogisticRegression(
            optimizer=optim.SGD(self.lr), l2=self.l2, intercept_lr=self.intercept_lr
        )
        self.positives = 0
        self.negatives = 0

    @property
    def examples(self) -> int:
        """Examples learnt, over the model's whole life (restores included)."""
        return self.positives + self.negatives

    def positive_weight(self) -> float:
        """The weight a positive learnt now gets (1 when weighting is off)."""
        return positive_weight(self.positives, self.negatives) if self.weight_positives else 1.0

    # -- the uniform interface -------------------------------------------------------------

    def learn_one(self, x: Sequence[float], y: bool, w: float = 1.0) -> None:
        """Learn one served vector (NaN = missing) and its label; ``w`` weights the example."""
        row = model_rows([x], self.names)[0]
        self._learn(row, self.scaler.transform_one(rows_as_dicts(row[None], self.names)[0]), y, w)

    def predict_proba_one(self, x: Sequence[float]) -> float:
        """The probability that the payment with this served vector is fraud."""
        return self.predict_proba_dict(as_river_inputs([x], self.names)[0])

    # -- the same on inputs already converted (one conversion for several models) -----------

    def learn_dict(self, x: dict[str, float], y: bool, w: float = 1.0) -> None:
        """:meth:`learn_one` on an input from :func:`as_river_inputs`."""
        x = self._ordered(x)
        self._learn(self._row(x), self.scaler.transform_one(x), y, w)

    def predict_proba_dict(self, x: dict[str, float]) -> float:
        """:meth:`predict_proba_one` on an input from :func:`as_river_inputs`."""
        return self._proba(self.scaler.transform_one(self._ordered(x)))

    def predict_learn_dict(self, x: dict[str, float], y: bool, w: float = 1.0) -> float:
        """Predict, then learn, one input: the probability before learning it (progressive validation).

        The same as :meth:`predict_proba_dict` then :meth:`learn_dict`, standardising once.
        """
        x = self._ordered(x)
        return self.predict_learn(x, self._row(x), y, w)

    def predict_learn(self, x: dict[str, float], row: np.ndarray, y: bool, w: float = 1.0) -> float:
        """:meth:`predict_learn_dict` of one row of :func:`model_rows` (``row``) and of the same
        row from :func:`rows_as_dicts` (``x``): what :class:`~stream_ml.feedback.online.OnlineLearner`
        has at hand, so nothing is converted per example."""
        z = self.scaler.transform_one(x)
        p = self._proba(z)
        self._learn(row, z, y, w)
        return p

    def _ordered(self, x: dict[str, float]) -> dict[str, float]:
        """``x`` with every name in order, as the scaler takes it (a KeyError for a missing one)."""
        return x if list(x) == self.names else {n: x[n] for n in self.names}

    def _row(self, x: dict[str, float]) -> np.ndarray:
        return np.array(list(x.values()), dtype=np.float64)

    def _learn(self, row: np.ndarray, z: dict[str, float], y: bool, w: float) -> None:
        # The model learns x standardised as it was when predicted (the scaler's statistics before
        # x), then the scaler learns x: one standardisation per example instead of two (a fifth of
        # the model's time), and a running scaler barely moves per example anyway.
        y = bool(y)
        if y:
            self.positives += 1
            w *= self.positive_weight()
        else:
            self.negatives += 1
        self.model.learn_one(z, y, w)
        self.scaler.learn(row)

    def _proba(self, z: dict[str, float]) -> float:
        p = self.model.predict_proba_one(z)[True]
        w = self.positive_weight()
        # odds / w, i.e. sigmoid(logit − log w); river's sigmoid saturates to exactly 0 or 1 past
        # |logit| 30, which this keeps.
        return p / (p + (1.0 - p) * w)

    # -- export and restore ---------------------------------------------------------------

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The whole state as ``OnlineLogisticModule`` tensors, and the architecture to record."""
        module = OnlineLogisticModule(len(self.names))
        f64 = torch.float64
        with torch.no_grad():
            module.mean.copy_(torch.tensor(self.scaler.means.tolist(), dtype=f64))
            module.var.copy_(torch.tensor(self.scaler.vars.tolist(), dtype=f64))
            module.count.copy_(torch.tensor([int(c) for c in self.scaler.counts.tolist()]))
            weights = self.model.weights
            module.linear.weight.copy_(torch.tensor([[weights.get(n, 0.0) for n in self.names]], dtype=f64))
            module.linear.bias.fill_(float(self.model.intercept))
            module.logit_offset.fill_(-math.log(self.positive_weight()))
            module.class_counts.copy_(torch.tensor([self.negatives, self.positives]))
            module.steps.fill_(self.model.optimizer.n_iterations)
        architecture = module.architecture() | {
            "lr": self.lr,
            "intercept_lr": self.intercept_lr,
            "l2": self.l2,
            "weight_positives": self.weight_positives,
        }
        return {k: v.clone() for k, v in module.state_dict().items()}, architecture

    @classmethod
    def from_tensors(
        cls, weights: Mapping[str, torch.Tensor], architecture: Mapping, names: Sequence[str]
    ) -> OnlineLogistic:
        """The learner exactly as :meth:`to_tensors` saw it: same predictions, same next steps."""
        if architecture.get("kind") != ONLINE_LOGISTIC:
            raise ValueError(f"not an {ONLINE_LOGISTIC} model: architecture {architecture.get('kind')!r}")
        if architecture.get("n_inputs") != len(names):
            raise ValueError(f"the model has {architecture.get('n_inputs')} inputs, {len(names)} names given")
        # Strict loading checks every tensor's presence and shape before anything is used.
        module = OnlineLogisticModule(len(names))
        module.load_state_dict(dict(weights), strict=True)
        new = cls(
            names,
            lr=architecture["lr"],
            intercept_lr=architecture["intercept_lr"],
            l2=architecture["l2"],
            weight_positives=architecture["weight_positives"],
        )
        names = new.names
        new.scaler = RunningScaler.from_state(
            module.count.tolist(), module.mean.tolist(), module.var.tolist()
        )
        for name, value in zip(names, module.linear.weight[0].tolist(), strict=True):
            new.model._weights[name] = value  # river has no public setter for a GLM's weights
        new.model.intercept = module.linear.bias.item()
        new.model.optimizer.n_iterations = int(module.steps.item())
        new.negatives, new.positives = (int(c) for c in module.class_counts.tolist())
        return new
