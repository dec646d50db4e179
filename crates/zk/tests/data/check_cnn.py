#!/usr/bin/env python3
"""Cross-checks the Rust float forward pass of the test models against onnxruntime.

Run `cargo test -p modelhub-zk --test it write_cnn_for_onnxruntime -- --ignored` first, then
/work/main/.venv/bin/python crates/zk/tests/data/check_cnn.py (from the repository root).
"""
import json

import numpy as np
import onnxruntime as ort

for name in ["zk-cnn", "zk-cnn-maxpool", "zk-cnn-global-maxpool", "zk-mlp-sigmoid", "zk-mlp-tanh"]:
    sess = ort.InferenceSession(f"target/{name}.onnx", providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    data = json.load(open(f"target/{name}.json"))
    x = np.array(data["inputs"], dtype=np.float32)
    for i in range(len(x)):
        (y,) = sess.run(None, {feed: x[i : i + 1]})
        diff = np.abs(y[0] - np.array(data["outputs"][i])).max()
        assert diff < 1e-4, (name, i, diff)
    print(name, ": rust float forward == onnxruntime on", len(x), "inputs")
