"""The tutorial way to serve a scikit-learn model: a pydantic-validated FastAPI route.

A peer for the benchmark, run from its own environment: `uvicorn tutorial_app:app` with
TUTORIAL_MODELS naming a folder of `<name>.joblib` files.
"""

import os
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

app = FastAPI()
models: dict[str, Any] = {
    path.stem: joblib.load(path)
    for path in sorted(Path(os.environ.get("TUTORIAL_MODELS", ".")).glob("*.joblib"))
}


class PredictRequest(BaseModel):
    instances: list[list[float]]


class PredictResponse(BaseModel):
    predictions: list[str]
    probabilities: list[list[float]]


@app.post("/models/{name}/predict")
def predict(name: str, request: PredictRequest) -> PredictResponse:
    model = models.get(name)
    if model is None:
        raise HTTPException(status_code=404, detail=f"no model {name}")
    features = np.asarray(request.instances, dtype=np.float32)
    return PredictResponse(
        predictions=[str(label) for label in model.predict(features)],
        probabilities=model.predict_proba(features).tolist(),
    )
