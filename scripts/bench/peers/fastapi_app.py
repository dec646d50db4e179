"""The Python peer of `scripts/bench/serve`: FastAPI + onnxruntime, the usual way to serve an
ONNX model from Python. POST /predict takes the same JSON body as Model Hub's predict (and as
OIP v2 infer) and answers the outputs as JSON. No signing, no charging.

Run: BENCH_MODEL=model.onnx uvicorn fastapi_app:app --workers 2 --port PORT
"""

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request

app = FastAPI()
session = ort.InferenceSession(os.environ["BENCH_MODEL"], providers=["CPUExecutionProvider"])
outputs = [o.name for o in session.get_outputs()]


@app.post("/predict")
async def predict(request: Request):
    body = await request.json()
    feeds = {
        t["name"]: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
        for t in body["inputs"]
    }
    values = session.run(None, feeds)
    return {
        "outputs": [
            {"name": n, "shape": list(v.shape), "datatype": str(v.dtype), "data": v.ravel().tolist()}
            for n, v in zip(outputs, values)
        ]
    }
