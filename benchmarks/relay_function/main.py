"""The bare round trip the stream benchmark compares against: push in, publish the same bytes out.

No decoding, validation or model: what Pub/Sub (emulator) and functions-framework cost by themselves.
"""

import base64
import functools
import os

import functions_framework
from google.cloud import pubsub_v1


@functools.cache
def _publisher():
    # Per worker process, after the fork (gRPC channels must not cross one).
    client = pubsub_v1.PublisherClient(batch_settings=pubsub_v1.types.BatchSettings(max_messages=1))
    return client, client.topic_path(os.environ["GOOGLE_CLOUD_PROJECT"], os.environ["RELAY_TO_TOPIC"])


@functions_framework.cloud_event
def relay(cloud_event):
    client, topic = _publisher()
    message = cloud_event.data["message"]
    client.publish(topic, base64.b64decode(message["data"]), **message.get("attributes", {})).result(timeout=30)
