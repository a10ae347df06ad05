"""chi2 of a Cannon label fit as a polynomial in the scaled labels, for both backends.

For one spectrum with pixel weights w and flux f,

    chi2(x) = sum_p w_p (f_p - theta_p . v(x))^2 = sum_m c_m x^monomials[m],

because every product v_k v_l of two terms is one monomial of the labels:

    c = sum over pairs k <= l of (2 - [k == l]) (theta^T W theta)_kl   at the monomial of v_k v_l
        - 2 (theta^T W f)_k                                           at the monomial of v_k
        + f^T W f                                                      at the constant.

A quadratic model in 17 labels has 5985 such monomials against 14706 pairs (k, l), so the
coefficients cost 2.5x fewer operations than the Gram matrix theta^T W theta; after them an
LM step costs nothing per pixel. The gradient and Hessian of chi2 are matrix-vector products
with two matrices built once per spectrum from c:

    d chi2 / dx_a          = sum_j G1[a, j] x^monomials[grad_basis[j]]
    d2 chi2 / dx_a dx_b    = sum_j G2[r, j] x^monomials[hess_basis[j]]   (a <= b)

where r numbers the pairs a <= b in row-major order and an entry (row, column, m, factor) of
grad_entries / hess_entries adds factor * c_m to G[row, column].
"""

from functools import lru_cache
from typing import NamedTuple

import numpy as np


class Chi2Polynomial(NamedTuple):
    """Index tables of the chi2 polynomial (see the module docstring).

    monomials     (n_monomials, n_labels) int: every v_k v_l and all its divisors, in
                  lexicographic order, so a monomial's parent precedes it and row 0 is the
                  constant
    parent        (n_monomials, 2) int64: (p, a) with x^monomials[m] = x^monomials[p] * x_a;
                  (-1, -1) for row 0
    pair_monomial (n_terms, n_terms) int64: the monomial of v_k v_l
    grad_basis    (n_grad_basis,) int64, hess_basis (n_hess_basis,) int64: rows of monomials
    grad_entries  (n_grad_entries, 4) int64: (label, column, monomial, factor)
    hess_entries  (n_hess_entries, 4) int64: (pair r of labels a <= b, column, monomial, factor)
    """

    monomials: np.ndarray
    parent: np.ndarray
    pair_monomial: np.ndarray
    grad_basis: np.ndarray
    grad_entries: np.ndarray
    hess_basis: np.ndarray
    hess_entries: np.ndarray


def _sorted_groups(rows):
    """Lexicographic order of rows (first column most significant) and, in that order, the
    number of each run of equal rows. np.lexsort on integer columns: np.unique(axis=0)
    sorts structured records, which made the 17-label tables take 0.83 s instead of 0.18."""
    order = np.lexsort(rows.T[::-1])
    ordered = rows[order]
    new_run = np.ones(len(rows), dtype=bool)
    new_run[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    return order, ordered, np.cumsum(new_run) - 1


def _unique_rows(rows):
    """The distinct rows, in lexicographic order."""
    _, ordered, run = _sorted_groups(rows)
    return ordered[np.flatnonzero(np.diff(run, prepend=-1))]


def _rows_in(table, queries):
    """Row of `table` (distinct rows in lexicographic order) equal to each row of `queries`;
    every query must be in the table."""
    order, _, run = _sorted_groups(np.vstack([table, queries]))
    index = np.empty(len(order), dtype=np.int64)
    index[order] = run  # the runs are numbered as the table's rows
    return index[len(table):]


def _derivative_table(monomials, used, lowered_by):
    """For each (row, lowering) in lowered_by: the monomials m in `used` that the lowering
    divides, the column of m / lowering in a basis, and the derivative's integer factor.
    Returns basis (rows of monomials) and entries (n, 4)."""
    rows, ms, targets, factors = [], [], [], []
    powers = monomials[used]
    for row, lowering in enumerate(lowered_by):
        labels = np.flatnonzero(lowering)
        divides = np.all(powers[:, labels] >= lowering[labels], axis=1)
        # d^k x^e / dx_a^k = e (e - 1) ... (e - k + 1) x^(e - k)
        factor = np.ones(divides.sum(), dtype=np.int64)
        for a in labels:
            for step in range(lowering[a]):
                factor *= powers[divides, a] - step
        rows.append(np.full(divides.sum(), row))
        ms.append(used[divides])
        targets.append(powers[divides] - lowering)
        factors.append(factor)
    target_rows = _rows_in(monomials, np.vstack(targets))
    basis = np.unique(target_rows)
    entries = np.column_stack([np.concatenate(rows), np.searchsorted(basis, target_rows),
                               np.concatenate(ms), np.concatenate(factors)])
    return basis, entries.astype(np.int64)


def chi2_polynomial(exponents):
    """Chi2Polynomial of a vectorizer's exponents (n_terms, n_labels), term 0 the constant.
    Cached: a 17-label quadratic model takes 0.12-0.26 s (measured in different machine
    states), and a survey fits in many calls."""
    return _tables(exponents.shape, exponents.astype(np.int64).tobytes())


@lru_cache(maxsize=8)
def _tables(shape, exponent_bytes):
    n_terms, n_labels = shape
    exponents = np.frombuffer(exponent_bytes, dtype=np.int64).reshape(shape)
    unit = np.eye(n_labels, dtype=np.int64)
    rows, cols = np.triu_indices(n_terms)
    pairs = exponents[rows] + exponents[cols]
    monomials = _unique_rows(pairs)
    while True:  # all divisors, so that every monomial is its parent times one label
        lowered = [monomials[monomials[:, a] > 0] - unit[a] for a in range(n_labels)]
        grown = _unique_rows(np.vstack([monomials, *lowered]))
        if len(grown) == len(monomials):
            break
        monomials = grown
    parent = np.full((len(monomials), 2), -1, dtype=np.int64)
    label = np.argmax(monomials[1:] > 0, axis=1)
    parent[1:, 0] = _rows_in(monomials, monomials[1:] - unit[label])
    parent[1:, 1] = label
    pair_monomial = np.empty((n_terms, n_terms), dtype=np.int64)
    pair_monomial[rows, cols] = pair_monomial[cols, rows] = _rows_in(monomials, pairs)
    used = np.unique(pair_monomial)
    grad_basis, grad_entries = _derivative_table(monomials, used, unit)
    upper_a, upper_b = np.triu_indices(n_labels)
    hess_basis, hess_entries = _derivative_table(monomials, used, unit[upper_a] + unit[upper_b])
    tables = Chi2Polynomial(monomials, parent, pair_monomial, grad_basis, grad_entries,
                            hess_basis, hess_entries)
    for table in tables:  # shared by every call through the cache
        table.flags.writeable = False
    return tables


def use_polynomial_form(exponents, n_starts):
    """Whether a label fit should run on the chi2 polynomial rather than on per-pixel sums.

    Both backends decide the same way, by operation counts per pixel and spectrum: the
    polynomial's coefficients cost n_monomials (formed by matrix products shared by a batch
    of spectra, about three times as fast per operation) plus one exact pass at the solution;
    per-pixel sums cost n_terms per start and n_terms + (non-zero derivatives) +
    n_labels^2 / 2 per evaluation, about 6 evaluations per fit. Quadratic models on 8575
    pixels, 192 spectra, 1 thread, polynomial against per-pixel: 8 labels 0.6 against 2.3 ms
    per spectrum, 13 labels 1.9 against 6.5, 17 labels 5.8 against 11.7-13.2.

    The polynomial form also has a fixed cost per call (the theta-row products, and matrix
    products padded to 16 spectra), which this rule leaves out: one spectrum alone takes
    109 ms at 17 labels on 1 thread, against 41 ms with per-pixel sums (from ~10 spectra per
    call the polynomial is faster). The choice does not depend on the number of spectra, so a
    survey fitted in pieces gives the same results as fitted whole.
    """
    n_terms, n_labels = exponents.shape
    n_monomials = _monomial_count(exponents.shape, exponents.astype(np.int64).tobytes())
    evaluation = n_terms + np.count_nonzero(exponents) + n_labels * (n_labels + 1) / 2
    return n_monomials / 3 + evaluation <= n_starts * n_terms + 6 * evaluation


@lru_cache(maxsize=8)
def _monomial_count(shape, exponent_bytes):
    exponents = np.frombuffer(exponent_bytes, dtype=np.int64).reshape(shape)
    rows, cols = np.triu_indices(shape[0])
    return len(_unique_rows(exponents[rows] + exponents[cols]))
