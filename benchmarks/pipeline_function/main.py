"""What function_bench.py measures the serving function against: the function as it was before serving forms.

The same service, configuration and model, but scored the old way: the logged
scikit-learn pipeline, unpickled at cold start (pandas, scikit-learn and SciPy come
with it), one DataFrame per ride. Cold start, memory and handler time of both run
side by side in one benchmark run.
"""

from dataclasses import replace

from pipeline_model import load_pipeline

from serving_function.function_config import FunctionConfig
from serving_function.model_store import find_model_uri, load_model
from serving_function.prediction import build_service

CONFIG = FunctionConfig.from_env()
MODEL_URI = CONFIG.model_uri or find_model_uri(CONFIG.model_bucket, CONFIG.run_id, CONFIG.model_prefix)
# The contract and identity as the function loads them; the scoring by the unpickled pipeline.
SERVICE = build_service(CONFIG, replace(load_model(MODEL_URI), model=load_pipeline(MODEL_URI)))


def predict_duration(event, context):
    SERVICE.handle(event.get("data"), message_id=getattr(context, "event_id", None))
