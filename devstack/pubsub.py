"""Pub/Sub topology helpers: create topics and subscriptions if missing (emulator or real).

Each helper talks to ``emulator_host`` when given one, else to whatever the
environment says (``PUBSUB_EMULATOR_HOST``, or Google Cloud itself).
"""

from __future__ import annotations

import contextlib

import grpc
from google.api_core import exceptions
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

# Poison messages are dead-lettered by the function itself; this bounds redelivery of
# messages that keep failing for other reasons (as the Terraform in infra/ does).
ACK_DEADLINE_SECONDS = 30


def publisher_client(emulator_host: str | None = None) -> pubsub_v1.PublisherClient:
    if emulator_host is None:
        return pubsub_v1.PublisherClient()
    # The emulator speaks plain gRPC without credentials.
    return pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=grpc.insecure_channel(emulator_host)))


def subscriber_client(emulator_host: str | None = None) -> pubsub_v1.SubscriberClient:
    if emulator_host is None:
        return pubsub_v1.SubscriberClient()
    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(emulator_host)))


def ensure_topic(project: str, topic: str, emulator_host: str | None = None) -> str:
    client = publisher_client(emulator_host)
    path = client.topic_path(project, topic)
    with contextlib.suppress(exceptions.AlreadyExists):
        client.create_topic(name=path)
    return path


def ensure_subscription(
    project: str, topic: str, subscription: str, push_endpoint: str | None = None, emulator_host: str | None = None
) -> str:
    """A pull subscription, or a push one delivering to ``push_endpoint``."""
    subscriber = subscriber_client(emulator_host)
    path = subscriber.subscription_path(project, subscription)
    request = {
        "name": path,
        "topic": pubsub_v1.PublisherClient.topic_path(project, topic),
        "ack_deadline_seconds": ACK_DEADLINE_SECONDS,
    }
    if push_endpoint:
        request["push_config"] = {"push_endpoint": push_endpoint}
    try:
        subscriber.create_subscription(request=request)
    except exceptions.AlreadyExists:
        if push_endpoint:  # point an existing push subscription at the (new) endpoint
            subscriber.modify_push_config(subscription=path, push_config={"push_endpoint": push_endpoint})
    finally:
        subscriber.close()
    return path


def delete_subscription(project: str, subscription: str, emulator_host: str | None = None) -> None:
    """Remove a subscription if it exists (what it held goes with it)."""
    subscriber = subscriber_client(emulator_host)
    try:
        with contextlib.suppress(exceptions.NotFound):
            subscriber.delete_subscription(subscription=subscriber.subscription_path(project, subscription))
    finally:
        subscriber.close()


def pull_messages(project: str, subscription: str, count: int, timeout: float = 30) -> list[pubsub_v1.types.PubsubMessage]:
    """Synchronously pull and ack until ``count`` messages arrived or ``timeout`` passed."""
    import time

    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(project, subscription)
    received: list[pubsub_v1.types.PubsubMessage] = []
    deadline = time.monotonic() + timeout
    try:
        while len(received) < count and time.monotonic() < deadline:
            try:
                response = subscriber.pull(subscription=path, max_messages=100, timeout=min(5, timeout))
            except exceptions.DeadlineExceeded:
                continue
            if response.received_messages:
                subscriber.acknowledge(subscription=path, ack_ids=[m.ack_id for m in response.received_messages])
                received.extend(m.message for m in response.received_messages)
    finally:
        subscriber.close()
    return received
