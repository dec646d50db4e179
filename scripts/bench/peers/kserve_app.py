"""The KServe peer of `scripts/bench/serve`: the KServe Python model server (`kserve` from
PyPI) serving the ONNX file with onnxruntime over OIP v2 REST
(POST /v2/models/bench/infer), as a custom `kserve.Model`.

Run: python kserve_app.py --model_file model.onnx --http_port PORT --grpc_port PORT2 --workers 2
"""

import argparse

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve import model_server
from kserve.utils.utils import generate_uuid


class OnnxModel(Model):
    # With several workers KServe pickles the model into each; an onnxruntime session can't be
    # pickled, so each worker opens its own on first use.
    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        self.session = None
        self.ready = True

    def __getstate__(self):
        state = self.__dict__.copy()
        state["session"] = None
        return state

    async def predict(self, payload: InferRequest, headers=None, response_headers=None):
        if self.session is None:
            self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
            self.outputs = [o.name for o in self.session.get_outputs()]
        feeds = {i.name: i.as_numpy().astype(np.float32) for i in payload.inputs}
        values = self.session.run(None, feeds)
        out = []
        for name, v in zip(self.outputs, values):
            o = InferOutput(name=name, shape=list(v.shape), datatype="FP32")
            o.set_data_from_numpy(np.asarray(v, dtype=np.float32), binary_data=False)
            out.append(o)
        return InferResponse(
            response_id=payload.id or generate_uuid(), model_name=self.name, infer_outputs=out
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_file", required=True)
    args, _ = parser.parse_known_args()
    ModelServer().start([OnnxModel("bench", args.model_file)])
