"""Shaping a batch of token rows for decoding, shared by the torch and NumPy decoders."""

import numpy as np


def distinct_rows(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(first, copies): the index of the first occurrence of each distinct row, and for every row the number of its
    distinct row, so that rows == [rows[i] for i in first][copies]."""
    number: dict[tuple, int] = {}
    first, copies = [], []
    for i, row in enumerate(rows):
        if tuple(row) not in number:
            number[tuple(row)] = len(first)
            first.append(i)
        copies.append(number[tuple(row)])
    return np.array(first), np.array(copies)


def left_pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The rows padded on the left with token 0 to the longest (B, T), and each row's amount of padding (B,)."""
    longest = max(map(len, rows))
    pad = np.array([longest - len(r) for r in rows])
    return np.array([[0] * p + r for p, r in zip(pad, rows)]), pad
