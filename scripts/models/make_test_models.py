#!/usr/bin/env python3
"""Builds the test models of Model Hub and their expected outputs.

Writes into OUT (default .cache/test-models):
  digits_mlp.onnx        scikit-learn MLPClassifier (64 -> 16 -> 10) trained on the bundled
                         digits data, exported by skl2onnx (outputs: label INT64, probabilities FP32)
  digits_expected.json   a few test rows with onnxruntime's outputs for them
  digits_input.json      a predict request body for one test row
  not_onnx.bin           bytes that are not an ONNX model
Deterministic: fixed seeds; nothing is downloaded.
"""
import argparse
import json
import os

import numpy as np
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".cache/test-models")
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=600, random_state=0)
    clf.fit(x_train, y_train)
    onx = to_onnx(clf, x_train[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    model_path = os.path.join(out, "digits_mlp.onnx")
    with open(model_path, "wb") as f:
        f.write(onx.SerializeToString())

    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    rows = x_test[:8]
    label, probs = sess.run(None, {"X": rows})
    cases = []
    for i in range(len(rows)):
        cases.append({
            "input": rows[i].tolist(),
            "label": int(label[i]),
            "probabilities": [float(p) for p in probs[i]],
            "truth": int(y_test[i]),
        })
    batch_label, batch_probs = sess.run(None, {"X": rows})
    expected = {
        "input_name": sess.get_inputs()[0].name,
        "outputs": [o.name for o in sess.get_outputs()],
        "test_accuracy": float(clf.score(x_test, y_test)),
        "cases": cases,
        "batch": {"input": rows.reshape(-1).tolist(), "shape": list(rows.shape),
                  "label": batch_label.tolist(), "probabilities": batch_probs.reshape(-1).tolist()},
    }
    with open(os.path.join(out, "digits_expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    with open(os.path.join(out, "digits_input.json"), "w") as f:
        json.dump({"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32",
                               "data": rows[0].tolist()}]}, f)
    with open(os.path.join(out, "not_onnx.bin"), "wb") as f:
        f.write(b"this is not an onnx model\x00\x01\x02" * 10)
    print(f"wrote {model_path} ({os.path.getsize(model_path)} bytes), accuracy {expected['test_accuracy']:.3f}")


if __name__ == "__main__":
    main()
