"""Triton Inference Server through PyTriton: one ONNX file per model in an onnxruntime session.

A peer for the benchmark, run from its own environment (bench/.triton-venv, made from
Debian's Python 3.11, the interpreter PyTriton's Python-backend stub is built against):
`python triton_app.py --repository DIR --version 2 --model iris --http-port PORT ...`.
Each model is bound under its own name and version, so it answers at the same V2 path as
modelserve, with the same output names: `label` and `probabilities`.
"""

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

# Large enough for the benchmark's 10,000-row requests, which Triton will not split.
MAX_BATCH_SIZE = 16_384
# A session output type → what the bound function returns and declares.
DTYPES: dict[str, Any] = {
    "tensor(string)": bytes,
    "tensor(int64)": np.int64,
    "tensor(float)": np.float32,
}


def session(path: Path) -> ort.InferenceSession:
    """One intra-op and one inter-op thread, as modelserve's default ONNX runtime options."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def infer_function(model: ort.InferenceSession) -> Any:
    """The model's session behind PyTriton's `batch`: whole batches in, whole batches out."""
    names = [output.name for output in model.get_outputs()]

    # `batch` passes each input tensor by its name.
    def infer(input: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
        results = dict(zip(names, model.run(names, {"input": input}), strict=True))
        label = results["label"].reshape(-1, 1)
        if label.dtype == object:  # string class labels: Triton's BYTES are bytes
            label = np.char.encode(label.astype(np.str_), "utf-8")
        return {"label": label, "probabilities": results["probabilities"]}

    return batch(infer)


def bind(triton: Triton, name: str, version: int, path: Path) -> None:
    model = session(path)
    types = {output.name: output.type for output in model.get_outputs()}
    features = model.get_inputs()[0].shape[1]
    triton.bind(
        model_name=name,
        model_version=version,
        infer_func=infer_function(model),
        inputs=[Tensor(name="input", dtype=np.float32, shape=(features,))],
        outputs=[
            # A label per row: Triton wants a non-empty shape after the batch dimension.
            Tensor(name="label", dtype=DTYPES[types["label"]], shape=(1,)),
            Tensor(name="probabilities", dtype=np.float32, shape=(-1,)),
        ],
        # A batch runs as soon as the model is free, with what has queued meanwhile.
        config=ModelConfig(max_batch_size=MAX_BATCH_SIZE, batcher=DynamicBatcher()),
        strict=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--version", type=int, default=2, help="the ONNX version of each model")
    parser.add_argument("--model", action="append", required=True, help="a model name")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--workspace", type=Path, help="PyTriton's work folder (removed on exit)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
    )
    triton = Triton(config=config, workspace=args.workspace)
    for name in args.model:
        bind(triton, name, args.version, args.repository / name / str(args.version) / "model.onnx")
    triton.serve()  # until SIGINT, which stops tritonserver and its stubs too


if __name__ == "__main__":
    main()
