"""The README's Spark, Ray and Dask recipes, taken from its code block to be run as printed."""

import re
from pathlib import Path
from typing import Any

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
TITLES = ("Dask", "Ray Data", "Spark")


def recipe(title: str) -> str:
    """The block's first lines (imports and the model reference) and the part under `# title`."""
    section = README.split("### Spark, Ray and Dask", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    parts = re.split(rf"^# ({'|'.join(TITLES)})\b.*$", block, flags=re.MULTILINE)
    named = dict(zip(parts[1::2], parts[2::2], strict=True))
    return f"{parts[0]}\n{named[title]}"


def run_recipe(title: str, repository: Path, **given: Any) -> Any:
    """Runs the recipe as printed, on `given` (`ddf`, `ds`, `df`), with the README's /models
    replaced by `repository`; returns its `scored`."""
    code = recipe(title).replace('"/models"', repr(str(repository)))
    # A module name no process can import: Spark pickles the recipe's functions by value.
    namespace: dict[str, Any] = {"__name__": "readme_recipe", **given}
    exec(compile(code, f"README.md ({title})", "exec"), namespace)
    return namespace["scored"]
