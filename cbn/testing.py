"""Helpers for checking gradients of NumPy layers, as cbn's own tests do.

Use them to check a custom layer or a whole model built around
:class:`cbn.BatchNorm` (in float64: central differences need the precision).
"""

import warnings

import numpy as np

__all__ = ["numerical_grad"]


def numerical_grad(f, arr, h=1e-6):
    """Central finite differences of the scalar ``f()`` with respect to every entry of ``arr``.

    Parameters
    ----------
    f : callable
        Takes no argument and returns a scalar that depends on ``arr``.
    arr : ndarray of float64
        Perturbed in place, one entry at a time, and restored afterwards.
    h : float
        Step; ``(f(arr + h e_i) - f(arr - h e_i)) / (2 h)`` per entry, with an
        error of order ``h**2``.

    Returns
    -------
    ndarray, shape and dtype of ``arr``

    Warns
    -----
    UserWarning
        ``arr`` is not float64 (as ``torch.autograd.gradcheck`` warns): in
        float32 a step of 1e-6 is below the spacing of most values, and the
        differences come out wrong by tens of per cent.
    """
    if getattr(arr, "dtype", None) != np.float64:
        warnings.warn(
            f"numerical_grad of a {getattr(arr, 'dtype', type(arr).__name__)} array: central "
            "differences need float64 (use .astype(np.float64) for the model and its data)",
            UserWarning, stacklevel=2)
    grad = np.zeros_like(arr)
    for i in np.ndindex(arr.shape):
        old = arr[i]
        arr[i] = old + h
        plus = f()
        arr[i] = old - h
        minus = f()
        arr[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad
