"""The Cannon's label vectorizer: a polynomial in shifted and scaled labels.

A term is a product of label powers, stored as one row of an integer exponent table
``exponents (n_terms, n_labels)``; term 0 is always the constant 1. Labels enter as
``x = (labels - offsets) / scales``.
"""

import itertools
import re

import numpy as np

from . import _validation as check

_TERM_FACTOR = re.compile(r"^\s*([^\s*^]+)\s*(?:\^\s*(\d+))?\s*$")


class PolynomialVectorizer:
    """Polynomial label vectorizer.

    Parameters
    ----------
    label_names : sequence of str, length n_labels
    order : int, 1, 2 or 3
        Full polynomial of this order with all cross terms (ignored if ``terms`` is given).
    terms : sequence of str, optional
        Explicit non-constant terms, e.g. ``["TEFF", "TEFF^2", "TEFF*LOGG"]``; the constant
        term is always added first.
    offsets, scales : array (n_labels,), optional
        Label shift and scale. If not given, ``fit_scaling`` sets them from training labels.
    """

    def __init__(self, label_names, order=2, terms=None, offsets=None, scales=None):
        self.label_names = _check_label_names(label_names)
        n_labels = len(self.label_names)
        if terms is None:
            if isinstance(order, bool) or order not in (1, 2, 3):
                raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
            rows = [np.zeros(n_labels, int)]
            for degree in range(1, order + 1):
                for combo in itertools.combinations_with_replacement(range(n_labels), degree):
                    rows.append(np.bincount(combo, minlength=n_labels))
            self.order = order
        else:
            if isinstance(terms, str):
                raise TypeError("terms must be a sequence of strings, not one string")
            rows = [np.zeros(n_labels, int)] + [self._parse_term(t) for t in terms]
            self.order = int(max(r.sum() for r in rows))
        self.exponents = np.ascontiguousarray(rows, dtype=np.int32)
        if len({tuple(r) for r in self.exponents}) != len(self.exponents):
            raise ValueError("terms contains a duplicate (or the constant term)")
        self.offsets = None if offsets is None else check.finite_array("offsets", offsets, 1)
        self.scales = None if scales is None else check.finite_array("scales", scales, 1)
        for name, value in (("offsets", self.offsets), ("scales", self.scales)):
            if value is not None and value.shape != (n_labels,):
                raise ValueError(f"{name} must have shape ({n_labels},), got {value.shape}")
        if self.scales is not None and np.any(self.scales <= 0):
            raise ValueError("scales must be > 0")

    def _parse_term(self, term):
        if not isinstance(term, str) or not term.strip():
            raise ValueError(f"terms: each term must be a non-empty string, got {term!r}")
        exponent = np.zeros(len(self.label_names), int)
        for factor in term.split("*"):
            match = _TERM_FACTOR.match(factor)
            if not match or match.group(1) not in self.label_names:
                raise ValueError(f"terms: cannot read {term!r}; use label names from "
                                 f"{list(self.label_names)} as 'A', 'A^2', 'A*B'")
            power = int(match.group(2) or 1)
            if power < 1:
                raise ValueError(f"terms: power must be >= 1 in {term!r}")
            exponent[self.label_names.index(match.group(1))] += power
        return exponent

    @property
    def n_labels(self):
        return len(self.label_names)

    @property
    def n_terms(self):
        return len(self.exponents)

    @property
    def term_names(self):
        """Readable names, e.g. ``['1', 'TEFF', 'LOGG', 'TEFF^2', 'TEFF*LOGG', 'LOGG^2']``."""
        names = []
        for row in self.exponents:
            factors = [name if e == 1 else f"{name}^{e}" for name, e in zip(self.label_names, row) if e]
            names.append("*".join(factors) or "1")
        return names

    @property
    def penalized(self):
        """(n_terms,) bool: True for every term but the constant (the L1 penalty skips it)."""
        return self.exponents.any(axis=1)

    def fit_scaling(self, labels):
        """Set offsets (mean) and scales (2.5-97.5 percentile range) from training labels.

        These are the choices of thecannon (Casey et al.), so regularization strengths mean
        the same thing in both. Given values are kept.
        """
        labels = check.labels(labels, self.n_labels)
        if self.offsets is None:
            self.offsets = labels.mean(axis=0)
        if self.scales is None:
            scales = np.ptp(np.percentile(labels, [2.5, 97.5], axis=0), axis=0)
            # A few distinct values can give a zero percentile range: fall back to the full range.
            scales = np.where(scales > 0, scales, np.ptp(labels, axis=0))
            constant = [n for n, s in zip(self.label_names, scales) if not s > 0]
            if constant:
                raise ValueError(f"labels: {constant} are constant in the training set")
            self.scales = scales
        return self

    def _require_scaling(self):
        if self.offsets is None or self.scales is None:
            raise RuntimeError("the vectorizer has no label scaling yet: train the model or "
                               "give offsets and scales")

    def scale(self, labels):
        """Physical labels (n, n_labels) -> scaled labels x."""
        self._require_scaling()
        return (labels - self.offsets) / self.scales

    def unscale(self, x):
        """Scaled labels x (n, n_labels) -> physical labels."""
        self._require_scaling()
        return x * self.scales + self.offsets

    def design_matrix(self, x):
        """Terms of scaled labels: x (n, n_labels) -> v (n, n_terms)."""
        return design_matrix(self.exponents, x)

    def design_derivative(self, x):
        """d v / d x: x (n, n_labels) -> (n, n_terms, n_labels)."""
        return design_derivative(self.exponents, x)


def design_matrix(exponents, x):
    """Polynomial terms: exponents (n_terms, n_labels), x (n, n_labels) -> v (n, n_terms)."""
    x = np.atleast_2d(x)
    v = np.ones((x.shape[0], exponents.shape[0]))
    for a in range(exponents.shape[1]):
        if exponents[:, a].any():
            v *= x[:, a:a + 1] ** exponents[:, a]
    return v


def design_derivative(exponents, x):
    """d v / d x: exponents (n_terms, n_labels), x (n, n_labels) -> (n, n_terms, n_labels)."""
    x = np.atleast_2d(x)
    out = np.zeros((x.shape[0],) + exponents.shape)
    for a in range(exponents.shape[1]):
        # Terms without label a have an exactly zero derivative (as in the compiled core), not
        # 0 * v, which is NaN where v overflows far outside the training box.
        has = exponents[:, a] > 0
        lowered = exponents[has].copy()
        lowered[:, a] -= 1
        out[:, has, a] = design_matrix(lowered, x) * exponents[has, a]
    return out


def _check_label_names(label_names):
    if isinstance(label_names, str):
        raise TypeError("label_names must be a sequence of strings, not one string")
    names = tuple(label_names)
    if not names:
        raise ValueError("label_names is empty")
    for name in names:
        if not isinstance(name, str) or not name or any(c in name for c in "*^ "):
            raise ValueError(f"label_names: {name!r} is not a usable name (non-empty, no '*', '^' or spaces)")
    if len(set(names)) != len(names):
        raise ValueError(f"label_names contains duplicates: {names}")
    return names
