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


def require_int(name, label, value):
    """TypeError unless `value` is an int (a bool is not): the type half of an int argument's check."""
    if not is_int(value):
        raise TypeError(f"{name}: {label} must be an int, got {type(value).__name__} {value!r}")


def require_number(name, label, value):
    """TypeError unless `value` is a real number (not a bool, not a tensor)."""
    if not is_number(value):
        raise TypeError(f"{name}: {label} must be a number, got {type(value).__name__} {value!r}")


def require_bool(name, label, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}: {label} must be a bool, got {type(value).__name__} {value!r}")


__all__ = ["is_finite_number", "is_int", "is_number", "require_bool", "require_int", "require_number"]
