"""Cloud Function: rides from BACKEND_PUSH_STREAM in, durations to BACKEND_PULL_STREAM out.

Entry points (same handler):
  predict_duration             1st gen background function, (event, context)
  predict_duration_cloudevent  2nd gen CloudEvent function

The model is loaded once per instance, here at import (cold start): by RUN_ID
from the MLflow artifact bucket, or from MODEL_URI. Only its serving form is read
(plain arrays scored with numpy): the function imports neither scikit-learn nor
pandas. A wrong RUN_ID fails the instance at start with the location it searched.

With neither RUN_ID nor MODEL_URI (the service as Terraform creates it, before the rollout
controller deploys the first production model) the instance starts, and every ride is refused
with an error (HTTP 500), so Pub/Sub redelivers it: never acknowledged unanswered.
"""

import functions_framework
from function_config import FunctionConfig
from model_store import find_model_uri, load_model
from prediction import RideDurationService, build_service, log


class NoModelConfigured(RuntimeError):
    """No model is configured yet: the ride must come back later, not be acknowledged."""


def _build_service() -> RideDurationService | None:
    config = FunctionConfig.from_env()
    if not config.has_model:
        log("WARNING", "no model configured: rides are refused for redelivery until a model is deployed")
        return None
    uri = config.model_uri or find_model_uri(config.model_bucket, config.run_id, config.model_prefix)
    loaded = load_model(uri)
    if config.run_id and loaded.run_id != config.run_id:
        raise RuntimeError(f"MODEL_URI {uri} was logged by run {loaded.run_id}, not RUN_ID {config.run_id}")
    # The contract's path shows which copy answers: the model's own (code/ride_contract) in production.
    log(
        "INFO",
        "model loaded",
        model_uri=uri,
        model_run_id=loaded.run_id,
        model_version=config.model_version,
        contract=loaded.contract.__file__,
        serving_form=loaded.model.kind,
        ride_range=loaded.interval.description if loaded.interval is not None else None,
    )
    return build_service(config, loaded)


SERVICE = _build_service()


def _service() -> RideDurationService:
    if SERVICE is None:
        raise NoModelConfigured("no model is configured (RUN_ID or MODEL_URI): refused so that Pub/Sub redelivers the ride")
    return SERVICE


def predict_duration(event, context):
    """1st gen Pub/Sub background function: event["data"] is the base64 ride JSON."""
    _service().handle(event.get("data"), message_id=getattr(context, "event_id", None), attributes=event.get("attributes"))


@functions_framework.cloud_event
def predict_duration_cloudevent(cloud_event):
    """2nd gen (Eventarc) Pub/Sub CloudEvent: the message is in data["message"]."""
    message = (cloud_event.data or {}).get("message", {})
    message_id = message.get("messageId") or cloud_event["id"]
    _service().handle(message.get("data"), message_id=message_id, attributes=message.get("attributes"))
