#!/usr/bin/env python3
"""Writes digits.json: the bundled scikit-learn digits data (nothing downloaded), split exactly as
scripts/models/make_test_models.py splits it for digits_mlp.onnx (test_size=0.25, random_state=0).

Each row is a 64-character string, pixel v (0..16) written as chr(ord('a') + v); the model input is
v / 16. Run: /work/main/.venv/bin/python crates/zk/tests/data/gen_digits.py
"""
import json
import os

from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def enc(rows):
    return ["".join(chr(ord("a") + int(v)) for v in row) for row in rows]


x, y = load_digits(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
out = {
    "train": enc(x_train), "train_labels": [int(v) for v in y_train],
    "test": enc(x_test), "test_labels": [int(v) for v in y_test],
}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.json"), "w") as f:
    json.dump(out, f, separators=(",", ":"))
