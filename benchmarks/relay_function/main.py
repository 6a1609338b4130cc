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
    # The Publish RPC itself, as the serving function calls it: the floor, without the batching machinery.
    client = pubsub_v1.PublisherClient()
    return client, client.topic_path(os.environ["GOOGLE_CLOUD_PROJECT"], os.environ["RELAY_TO_TOPIC"])


@functions_framework.cloud_event
def relay(cloud_event):
    client, topic = _publisher()
    message = cloud_event.data["message"]
    published = {"data": base64.b64decode(message["data"]), "attributes": message.get("attributes", {})}
    client.api.publish(topic=topic, messages=[published], timeout=30)
