#!/usr/bin/env python3
"""Builds the test models of Model Hub and their expected outputs.

Writes into OUT (default .cache/test-models):
  digits_mlp.onnx        scikit-learn MLPClassifier (64 -> 16 -> 10) trained on the bundled
                         digits data, exported by skl2onnx (outputs: label INT64, probabilities FP32)
  digits_expected.json   a few test rows with onnxruntime's outputs for them
  digits_input.json      a predict request body for one test row
  digits_mlp_logits.onnx the same trained MLP as plain Gemm -> Relu -> Gemm with a "logits"
                         output: the op set the prover compiles into a circuit
  digits_logits_expected.json  onnxruntime's logits for the test rows
  digits_logits_input.json     a predict request body (with "proof": true) for it
  mnist_mlp.onnx         an MNIST-size MLP 784 -> 128 -> 10 (Gemm, Relu, Gemm) trained on the
                         digits upsampled to 28x28, for benchmarks
  mnist_input.json       a predict request body for it
  exp.onnx               y = exp(x), x FP32 [N, 4]: a graph outside the circuit's op set
  not_onnx.bin           bytes that are not an ONNX model
Deterministic: fixed seeds; nothing is downloaded.
"""
import argparse
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier


def upsample(x):
    """8x8 digits in [0, 1] -> 28x28: each pixel a 3x3 block, 2 pixels of padding around."""
    imgs = x.reshape(-1, 8, 8)
    big = np.kron(imgs, np.ones((3, 3), dtype=np.float32))
    return np.pad(big, ((0, 0), (2, 2), (2, 2))).reshape(-1, 784).astype(np.float32)


def save_gemm_mlp(clf, n_in, path):
    """Writes a one-hidden-layer sklearn MLP as Gemm -> Relu -> Gemm (logits output)."""
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    inits = [numpy_helper.from_array(a.astype(np.float32), name) for a, name in
             [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]]
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", w2.shape[1]])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


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
    logits_path = os.path.join(out, "digits_mlp_logits.onnx")
    save_gemm_mlp(clf, 64, logits_path)
    lsess = ort.InferenceSession(logits_path, providers=["CPUExecutionProvider"])
    logits = lsess.run(None, {"input": x_test})[0]
    with open(os.path.join(out, "digits_logits_expected.json"), "w") as f:
        json.dump({
            "cases": [{"input": x_test[i].tolist(), "logits": logits[i].tolist(), "truth": int(y_test[i])}
                      for i in range(8)],
            "test_inputs": x_test.tolist(),
            "test_labels": y_test.tolist(),
            "float_argmax": logits.argmax(axis=1).tolist(),
        }, f)

    with open(os.path.join(out, "digits_logits_input.json"), "w") as f:
        json.dump({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                               "data": x_test[0].tolist()}], "proof": True}, f)

    # An MNIST-size MLP: digits upsampled 8x8 -> 28x28 (nearest, padded), 784 -> 128 -> 10.
    big_train = upsample(x_train)
    big = MLPClassifier(hidden_layer_sizes=(128,), max_iter=60, random_state=0)
    big.fit(big_train, y_train)
    save_gemm_mlp(big, 784, os.path.join(out, "mnist_mlp.onnx"))
    with open(os.path.join(out, "mnist_input.json"), "w") as f:
        json.dump({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
                               "data": upsample(x_test[:1])[0].tolist()}]}, f)

    # A valid model outside the circuit's op set (Exp): uploads, predicts, has no commitment.
    exp = helper.make_graph(
        [helper.make_node("Exp", ["x"], ["y"])], "exp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    exp_model = helper.make_model(exp, opset_imports=[helper.make_opsetid("", 17)])
    exp_model.ir_version = 8
    onnx.save(exp_model, os.path.join(out, "exp.onnx"))

    with open(os.path.join(out, "not_onnx.bin"), "wb") as f:
        f.write(b"this is not an onnx model\x00\x01\x02" * 10)
    print(f"wrote {model_path} ({os.path.getsize(model_path)} bytes), accuracy {expected['test_accuracy']:.3f}")


if __name__ == "__main__":
    main()
