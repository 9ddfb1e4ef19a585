"""Argument predicates shared by the ops and modules: Python ints and numbers as a caller means them (a bool is
not an int, a tensor is not a Python number)."""

import math
import numbers


def is_int(value):
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value):
    """A real number (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value):
    return is_number(value) and math.isfinite(value)


__all__ = ["is_finite_number", "is_int", "is_number"]
