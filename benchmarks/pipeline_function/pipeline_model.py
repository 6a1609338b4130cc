"""The logged scikit-learn pipeline behind the serving form's interface (rides in, minutes out), as scored before."""

import cloudpickle

from ride_contract.sklearn_features import rides_frame
from serving_function.model_store import _split_gs, _storage_client


class PipelineModel:
    kind = "sklearn pipeline"

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def predict(self, rides):
        return self.pipeline.predict(rides_frame(rides))


def load_pipeline(model_uri: str) -> PipelineModel:
    """The model folder's pickled pipeline (model.pkl), unpickled as the function did at every cold start."""
    bucket, folder = _split_gs(model_uri)
    return PipelineModel(cloudpickle.loads(_storage_client().bucket(bucket).blob(f"{folder}/model.pkl").download_as_bytes()))
