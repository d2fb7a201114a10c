"""What of the driver's environment travels to Ray workers, and what never does.

Ray writes every runtime env it sets up, ``env_vars`` included, to ``runtime_env_agent.log``
(ray-project/ray#28276), so the runtime env carries settings only: where S3 and MLflow are.
Credentials reach a worker through its node's own environment: a Kubernetes Secret in the pod spec
(``infra/k8s``), an instance role on AWS, or, for a local Ray that the driver starts with
``ray.init()`` (or ``make stack-up`` starts with the credentials), the environment the raylet
inherited.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

SETTINGS = (
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_S3_ENDPOINT_URL",
)
CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def settings_env() -> dict[str, str]:
    """The driver's S3 and MLflow settings for a runtime env's ``env_vars``; never credentials."""
    held_back = [name for name in CREDENTIALS if os.environ.get(name)]
    if held_back:
        log.info(
            "%s stay out of the Ray runtime env (Ray logs it); workers read credentials from their "
            "node's environment",
            ", ".join(held_back),
        )
    return {name: os.environ[name] for name in SETTINGS if os.environ.get(name)}
