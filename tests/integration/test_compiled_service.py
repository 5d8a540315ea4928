"""A Serve replica of RMBG-2.0 started with ``RMBG_COMPILE=decoder`` and a compiled artifact
(``RMBG_COMPILE_CACHE``) as an operator deploys one (docs/operations.md): the artifact built by
the tool for the replicas' settings, then the application deployed with them. On a CPU, the
published architecture with random weights at 128 pixels: the replica finds the decoder's
graph in the artifact (its own Inductor cache is empty), compiles nothing, and serves."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.load_test import synthetic_jpeg
from tests.conftest import REPO_ROOT, RMBG_ARCH_DIR, python_json
from tests.serve_cluster import Cluster, running_cluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
    ),
]

SIZE = 128
MAX_BATCH = 4
#: What the replicas and the tool share: the settings the artifact's key is made of.
SETTINGS = {
    "DEVICE": "cpu",
    "RMBG_TRUST_REMOTE_CODE": "true",
    "RMBG_COMPILE": "decoder",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, dict[str, Any]]]:
    """The artifact built by ``python -m segmentation.compile_cache``, then a cluster of the
    demo application with RMBG-2.0 pointed at the published code and the artifact."""
    workdir = tmp_path_factory.mktemp("compiled-service")
    artifacts = workdir / "artifacts"
    artifact = python_json(
        [
            *("-m", "segmentation.compile_cache", str(artifacts)),
            *("--max-batch-size", str(MAX_BATCH), "--input-size", str(SIZE)),
            *("--load-format", "dummy"),
        ],
        workdir / "inductor-build",
        **SETTINGS,
        RMBG_MODEL=str(RMBG_ARCH_DIR),
    )

    def edit(config: dict[str, Any]) -> None:
        app = config["applications"][0]
        app["runtime_env"]["env_vars"].update(
            {
                **SETTINGS,
                "RMBG_COMPILE_CACHE": str(artifacts),
                "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor-replica"),
            }
        )
        app["args"]["rmbg"].update(model=str(RMBG_ARCH_DIR), input_size=SIZE, load_format="dummy")
        rmbg = next(d for d in app["deployments"] if d["name"] == "RMBGDeployment")
        rmbg["user_config"]["max_batch_size"] = MAX_BATCH

    with running_cluster(REPO_ROOT / "configs" / "demo.yaml", workdir, edit=edit) as cluster:
        yield cluster, artifact


def test_a_replica_compiles_its_decoder_from_the_artifact_and_serves(
    compiled: tuple[Cluster, dict[str, Any]],
) -> None:
    cluster, artifact = compiled
    models = httpx.get(f"{cluster.url}/v1/models", timeout=60).json()["models"]
    rmbg = next(m for m in models if m["name"] == "rmbg-2.0")
    report = rmbg["compile"]
    assert report["key"] == artifact["key"]
    assert report["state"] == "artifact loaded: the decoder compiles from it"
    assert report["decoder"].startswith(f"compiled for batches of {MAX_BATCH} (the largest")
    # The replica's warm-up ran its full batch: the decoder's graph came from the artifact.
    assert report["inductor_cache"]["hits"] >= 1, report
    assert report["inductor_cache"]["misses"] == 0, report
    assert rmbg["inference_path"] == "sdpa+windows+decoder+deform+resample+fuse+compile-decoder"
    jpeg = synthetic_jpeg(160, 120, seed=3)
    answer = httpx.post(
        f"{cluster.url}/v1/remove-background",
        content=jpeg,
        headers={"Content-Type": "image/jpeg"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    cutout = np.asarray(Image.open(io.BytesIO(answer.content)))
    assert cutout.shape == (120, 160, 4)
