#!/usr/bin/env python3
"""Cross-checks the Rust float forward pass of the test CNN against onnxruntime.

Run `cargo test -p modelhub-zk --test it write_cnn_for_onnxruntime -- --ignored` first, then
/work/main/.venv/bin/python crates/zk/tests/data/check_cnn.py (from the repository root).
"""
import json

import numpy as np
import onnxruntime as ort

sess = ort.InferenceSession("target/zk-cnn.onnx", providers=["CPUExecutionProvider"])
data = json.load(open("target/zk-cnn.json"))
x = np.array(data["inputs"], dtype=np.float32)
for i in range(len(x)):
    (y,) = sess.run(None, {"X": x[i : i + 1]})
    diff = np.abs(y[0] - np.array(data["outputs"][i])).max()
    assert diff < 1e-4, (i, diff)
print("rust float forward == onnxruntime on", len(x), "inputs")
