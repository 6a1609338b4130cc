"""The serving form of a fitted model: plain numpy arrays in one ``.npz`` file, scored without scikit-learn.

Training writes it from the fitted pipeline itself (``training.serving_form``) into the
MLflow model folder, next to the pickled pipeline, which stays there for analysis. The
serving function loads only this: no pandas, no scikit-learn or SciPy to import, no
pickle to trust (``allow_pickle=False``).

What the file holds:
- ``pair_table``: the zone encodings and the zone-pair target encoding, evaluated by the
  fitted encoders for every (pickup, dropoff) zone pair a ride can have. A ride's zones are
  one index into it.
- ``numeric_features``: which of ``FEATURE_COLUMNS`` the model reads directly.
- for a forest (HistGradientBoosting): the bin edges of those numeric inputs, and the trees
  as sklearn grew them, on binned inputs (feature, bin threshold, categorical bitset,
  missing-value direction, children, leaf value); the pair table then holds bins.
- for a linear model: the pair table holds each pair's share of the sum (intercept
  included), and one coefficient per numeric feature.

A forest is scored the QuickScorer way (Lucchese et al., SIGIR 2015): at load, for every
input and bin, one bitmask per tree of the leaves still reachable; a ride's exit leaf in
every tree is then the lowest bit left after ANDing its inputs' masks: a few vectorized
numpy operations for all trees at once, instead of a walk per tree.

A model may also carry a range (``Interval``): two more serving forms, of the 10th and 90th
percentile models, and the conformal margin calibrated for them (``interval.json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ride_contract.features import FEATURE_COLUMNS, ride_feature_matrix
from ride_contract.ride import MAX_LOCATION_ID

FORMAT = "ridestream-serving-form/1"
FILE_NAME = "serving_form.npz"
# Beside it: real rides and what the fitted pipeline answered for them, as served. A rollout's
# pre-flight loads the version through the function's loader and must answer them alike.
REFERENCE_FILE = "reference_rides.json"
# The ride's range, beside them: the lower and upper quantile models' serving forms, and what makes
# them a calibrated range (the margin conformalized quantile regression adds on either side).
INTERVAL_FILE = "interval.json"
LOW_FORM_FILE = "serving_form_low.npz"
HIGH_FORM_FILE = "serving_form_high.npz"
INTERVAL_FORMAT = "ridestream-interval/1"
PAIR_BASE = MAX_LOCATION_ID + 1  # a ride's row in the pair table: PULocationID * PAIR_BASE + DOLocationID
N_BINS = 256  # HistGradientBoosting's bins: up to 255 for values, the last for missing values
MISSING_BIN = N_BINS - 1
_WORD = 64
_ALL_LEAVES = np.uint64(2**64 - 1)


class ServingFormError(ValueError):
    """The file is not a serving form this code can score."""


def pair_rows(features: np.ndarray) -> np.ndarray:
    """Each ride's row in the pair table, from its feature matrix."""
    return features[:, 0].astype(np.intp) * PAIR_BASE + features[:, 1].astype(np.intp)


class ServingForm:
    """A model's serving form: rides in, minutes out."""

    kind = ""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.numeric_features = np.asarray(arrays["numeric_features"], dtype=np.intp)

    @staticmethod
    def load(path: str | Path) -> ServingForm:
        """Read and check a serving form file; raises ServingFormError saying what is wrong."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError) as exc:
            raise ServingFormError(f"{path} is not a readable serving form: {exc}") from exc
        found = str(arrays.get("format", "none"))
        if found != FORMAT:
            raise ServingFormError(f"{path} has format {found!r}; this code scores {FORMAT!r}")
        if list(arrays["feature_columns"]) != FEATURE_COLUMNS:
            raise ServingFormError(f"{path} was written for features {list(arrays['feature_columns'])}, not {FEATURE_COLUMNS}")
        kinds = {form.kind: form for form in (ForestForm, LinearForm)}
        kind = str(arrays["kind"])
        if kind not in kinds:
            raise ServingFormError(f"{path} holds a model of kind {kind!r}; known kinds: {', '.join(kinds)}")
        return kinds[kind](arrays)

    def predict(self, rides: Sequence[Any]) -> np.ndarray:
        """Minutes for validated rides (``ride_contract.ride.Ride``)."""
        return self.predict_features(ride_feature_matrix(rides))

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """Minutes for a ``feature_matrix``."""
        raise NotImplementedError


class Interval:
    """A ride's range: [low quantile - margin, high quantile + margin] (conformalized quantile regression,
    Romano et al. 2019), in raw minutes; ``result.served_range`` makes it what riders are told."""

    def __init__(self, low: ServingForm, high: ServingForm, margin_minutes: float, description: Mapping[str, Any]):
        self.low, self.high, self.margin = low, high, float(margin_minutes)
        self.description = dict(description)  # interval.json: coverage, quantiles, calibration month and rides

    @staticmethod
    def load(path: str | Path) -> Interval:
        """``interval.json`` and the two serving forms beside it; raises ServingFormError saying what is wrong."""
        path = Path(path)
        try:
            description = json.loads(path.read_text())
            margin = float(description["margin_minutes"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ServingFormError(f"{path} is not a readable interval description: {exc}") from exc
        if description.get("format") != INTERVAL_FORMAT:
            raise ServingFormError(f"{path} has format {description.get('format')!r}; this code reads {INTERVAL_FORMAT!r}")
        if not np.isfinite(margin):
            raise ServingFormError(f"{path} has a margin of {margin} min")
        return Interval(
            ServingForm.load(path.with_name(LOW_FORM_FILE)), ServingForm.load(path.with_name(HIGH_FORM_FILE)), margin, description
        )

    def predict(self, rides: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Raw (low, high) minutes for validated rides."""
        return self.predict_features(ride_feature_matrix(rides))

    def predict_features(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.low.predict_features(features) - self.margin, self.high.predict_features(features) + self.margin


class LinearForm(ServingForm):
    """intercept + the pair's coefficients + coefficient * value for each numeric feature."""

    kind = "linear"

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        super().__init__(arrays)
        self.pair_table = np.asarray(arrays["pair_table"], dtype=np.float64)
        self.coefficients = np.asarray(arrays["numeric_coefficients"], dtype=np.float64)

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        return self.pair_table[pair_rows(features)] + features[:, self.numeric_features] @ self.coefficients


class ForestForm(ServingForm):
    """A HistGradientBoosting regressor (squared error): baseline + one leaf value per tree."""

    kind = "hist_gradient_boosting"

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        super().__init__(arrays)
        self.pair_table = np.asarray(arrays["pair_table"], dtype=np.intp)  # (pairs, pair inputs) bins
        self.pair_inputs = np.asarray(arrays["pair_inputs"], dtype=np.intp)
        self.numeric_inputs = np.asarray(arrays["numeric_inputs"], dtype=np.intp)
        edges, offsets = arrays["bin_edges"], arrays["bin_edge_offsets"]
        self.bin_edges = [edges[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        self.n_inputs = len(self.pair_inputs) + len(self.numeric_inputs)
        self.baseline = float(arrays["baseline"])
        self.masks, self.leaf_values = _compile(arrays, self.n_inputs)
        self._trees = np.arange(self.leaf_values.shape[0])

    def bins(self, features: np.ndarray) -> np.ndarray:
        """The model's binned inputs, one row per ride."""
        binned = np.empty((len(features), self.n_inputs), dtype=np.intp)
        binned[:, self.pair_inputs] = self.pair_table[pair_rows(features)]
        for column, feature, edges in zip(self.numeric_inputs, self.numeric_features, self.bin_edges, strict=True):
            values = features[:, feature]
            # A value's bin is the number of edges below it (sklearn's binning); NaN is the missing bin.
            binned[:, column] = np.where(np.isnan(values), MISSING_BIN, np.searchsorted(edges, values, side="left"))
        return binned

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        binned = self.bins(features)
        reachable = self.masks[0, binned[:, 0]]  # (rides, trees, words)
        for column in range(1, self.n_inputs):
            reachable &= self.masks[column, binned[:, column]]
        leaves = _lowest_set_bit(reachable)  # (rides, trees): each tree's exit leaf
        return self.baseline + self.leaf_values[self._trees, leaves].sum(axis=1)


def _lowest_set_bit(words: np.ndarray) -> np.ndarray:
    """Index of the lowest set bit over the last axis of uint64 words (some bit is always set)."""
    result = np.zeros(words.shape[:-1], dtype=np.intp)
    found = np.zeros(words.shape[:-1], dtype=bool)
    for index in range(words.shape[-1]):
        word = words[..., index]
        lowest = word & (~word + np.uint64(1))  # two's complement: only the lowest set bit stays
        position = np.bitwise_count(lowest - np.uint64(1)).astype(np.intp)  # bits below it
        take = ~found & (word != 0)
        result = np.where(take, index * _WORD + position, result)
        found |= take
    return result


def _leaf_ranges(left: np.ndarray, right: np.ndarray, is_leaf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leaves numbered left to right; for every node, the range [first, end) of the leaves below it."""
    first = np.zeros(len(left), dtype=np.intp)
    end = np.zeros(len(left), dtype=np.intp)
    counter = 0
    stack: list[tuple[int, bool]] = [(0, False)]
    while stack:  # post-order without recursion: a node's range is known once both children's are
        node, children_done = stack.pop()
        if is_leaf[node]:
            first[node], end[node] = counter, counter + 1
            counter += 1
        elif children_done:
            first[node], end[node] = first[left[node]], end[right[node]]
        else:
            stack.extend(((node, True), (int(right[node]), False), (int(left[node]), False)))
    return first, end


def _words(first: int, end: int, n_words: int) -> np.ndarray:
    bits = ((1 << int(end - first)) - 1) << int(first)
    return np.array([(bits >> (_WORD * w)) & (2**_WORD - 1) for w in range(n_words)], dtype=np.uint64)


def _compile(arrays: Mapping[str, np.ndarray], n_inputs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per input and bin, each tree's reachable leaves; and each tree's leaf values by leaf number."""
    offsets = arrays["tree_offsets"]
    feature, threshold = arrays["node_feature"], arrays["node_bin_threshold"]
    missing_left, is_leaf = arrays["node_missing_left"].astype(bool), arrays["node_is_leaf"].astype(bool)
    left, right, value = arrays["node_left"], arrays["node_right"], arrays["node_value"]
    categorical, bitset_row = arrays["node_is_categorical"].astype(bool), arrays["node_bitset_row"]
    # Bit b of row r: category bin b goes left at the split with bitset row r.
    goes_left_by_category = np.unpackbits(arrays["category_bitsets"].astype("<u4").view(np.uint8), axis=1, bitorder="little")

    n_trees = len(offsets) - 1
    n_words = -(-int(max(is_leaf[offsets[t] : offsets[t + 1]].sum() for t in range(n_trees))) // _WORD)
    masks = np.full((n_inputs, N_BINS, n_trees, n_words), _ALL_LEAVES, dtype=np.uint64)
    leaf_values = np.zeros((n_trees, n_words * _WORD), dtype=np.float64)
    bins = np.arange(N_BINS)
    for tree in range(n_trees):
        lo, hi = offsets[tree], offsets[tree + 1]
        first, end = _leaf_ranges(left[lo:hi], right[lo:hi], is_leaf[lo:hi])
        leaf_values[tree, first[is_leaf[lo:hi]]] = value[lo:hi][is_leaf[lo:hi]]
        for node in np.flatnonzero(~is_leaf[lo:hi]):
            split = lo + node
            goes_left = goes_left_by_category[bitset_row[split]].astype(bool) if categorical[split] else bins <= threshold[split]
            goes_left[MISSING_BIN] = missing_left[split]
            # Going right rules out every leaf of the left subtree.
            child = left[lo:hi][node]
            masks[feature[split], ~goes_left, tree] &= ~_words(first[child], end[child], n_words)
    return masks, leaf_values
