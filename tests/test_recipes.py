"""The README's Spark and Ray recipes, run as printed: Spark in local mode (a JVM), Ray in
local mode; the scored rows equal in-process score() (Dask: tests/test_scoring.py)."""

import importlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_iris

from service.scoring import ModelReference, score
from tests.recipes import TITLES, recipe, run_recipe

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROWS = 3000


def require(name: str) -> ModuleType:
    """The module; a missing one fails, saying how to install it (these tests are deselected
    unless asked for: `scripts/recipes.sh` installs the extra and runs them)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"{name} is missing ({exc}): pip install -e '.[recipes]' (scripts/recipes.sh)")


@pytest.fixture(scope="module")
def models(trained_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workers load the model from their own copy, as a job would from shared storage."""
    root = tmp_path_factory.mktemp("recipes") / "models"
    shutil.copytree(trained_repository, root)
    return root


def iris_rows() -> pd.DataFrame:
    """The columns of the README's Spark schema: a text id and the features as doubles."""
    data = np.resize(load_iris().data, (ROWS, 4))
    frame = pd.DataFrame(data, columns=FEATURES)
    frame.insert(0, "id", [f"r{i:05d}" for i in range(ROWS)])
    return frame


def assert_same_rows(remote: pd.DataFrame, models: Path) -> None:
    frame = iris_rows()
    local = score(frame, ModelReference(str(models), "iris", 2))
    remote = remote.sort_values("id", ignore_index=True)
    assert list(remote.columns) == list(local.columns)
    assert list(remote["id"]) == list(local["id"])
    assert list(remote["label"]) == list(local["label"])
    probabilities = [c for c in local.columns if c.startswith("probability_")]
    assert len(probabilities) == 3
    np.testing.assert_allclose(
        remote[probabilities].to_numpy(np.float64), local[probabilities].to_numpy(np.float64)
    )


def test_the_readme_block_holds_each_recipe() -> None:
    for title in TITLES:
        assert "ModelReference(" in recipe(title)
    assert "mapInPandas" in recipe("Spark")
    assert "map_batches" in recipe("Ray Data")


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    sql = require("pyspark.sql")
    if shutil.which("java") is None and "JAVA_HOME" not in os.environ:
        pytest.fail("Spark needs a JRE: apt-get install default-jre-headless (scripts/recipes.sh)")
    with pytest.MonkeyPatch.context() as patch:
        # Spark's Python workers run this interpreter, which imports modelserve.
        patch.setenv("PYSPARK_PYTHON", sys.executable)
        session = (
            sql.SparkSession.builder.master("local[2]")
            .appName("modelserve-recipes")
            .config("spark.ui.enabled", "false")
            .config("spark.sql.shuffle.partitions", "2")
            .getOrCreate()
        )
        yield session
        session.stop()


@pytest.mark.recipes
def test_the_spark_recipe_scores_like_in_process(spark: Any, models: Path) -> None:
    df = spark.createDataFrame(iris_rows()).repartition(4)
    scored = run_recipe("Spark", models, df=df)
    # collect(), not toPandas(): pyspark's own conversion warns under pandas 3.
    remote = pd.DataFrame([row.asDict() for row in scored.collect()])
    assert_same_rows(remote, models)


@pytest.mark.recipes
def test_the_ray_recipe_scores_like_in_process(models: Path) -> None:
    ray = require("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_pandas(iris_rows()).repartition(4)
        scored = run_recipe("Ray Data", models, ds=ds)
        remote = scored.to_pandas()
    finally:
        ray.shutdown()
    assert_same_rows(remote, models)
