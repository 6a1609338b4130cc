"""A recording gRPC proxy in front of the Pub/Sub emulator: every RPC is forwarded as raw bytes (status, details
and metadata come back unchanged), and what it does (publish to a topic, consume or view a subscription, ...)
is recorded for the identity this proxy serves, decoded with the client library's own message types.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.pubsub_v1 import types

Recorded = tuple[str, str]  # (resource, action)

# Pub/Sub's clients lift gRPC's message size limits; so does the proxy, in both directions.
_UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# Metadata gRPC sets itself on each hop; passing them on would be refused.
_RESERVED = ("user-agent", "content-type", "te", "grpc-")
STREAMING = {"/google.pubsub.v1.Subscriber/StreamingPull"}


def short_name(kind: str, path: str) -> str:
    """``projects/P/topics/T`` -> ``topic:T`` (the local stack has one project)."""
    return f"{kind}:{path.rsplit('/', 1)[-1]}"


def _topic(path: str) -> str:
    return short_name("topic", path)


def _subscription(path: str) -> str:
    return short_name("subscription", path)


def _create_subscription(s: types.Subscription) -> list[Recorded]:
    # Attaching a subscription to a topic is a permission on the topic (pubsub.topics.attachSubscription).
    return [(_subscription(s.name), "admin"), (_topic(s.topic), "attach")]


# Method -> (request type, the (resource, action) pairs a request needs). Methods not here are recorded as
# ("method:<name>", "call"), so nothing a deployable does goes unseen.
_PUBLISHER, _SUBSCRIBER = "/google.pubsub.v1.Publisher/", "/google.pubsub.v1.Subscriber/"
METHODS: dict[str, tuple[type, Callable[[object], list[Recorded]]]] = {
    _PUBLISHER + "Publish": (types.PublishRequest, lambda r: [(_topic(r.topic), "publish")]),
    _PUBLISHER + "CreateTopic": (types.Topic, lambda r: [(_topic(r.name), "admin")]),
    _PUBLISHER + "UpdateTopic": (types.UpdateTopicRequest, lambda r: [(_topic(r.topic.name), "admin")]),
    _PUBLISHER + "DeleteTopic": (types.DeleteTopicRequest, lambda r: [(_topic(r.topic), "admin")]),
    _PUBLISHER + "GetTopic": (types.GetTopicRequest, lambda r: [(_topic(r.topic), "view")]),
    _PUBLISHER + "ListTopics": (types.ListTopicsRequest, lambda r: [("project", "view")]),
    _PUBLISHER + "ListTopicSubscriptions": (types.ListTopicSubscriptionsRequest, lambda r: [(_topic(r.topic), "view")]),
    _PUBLISHER + "ListTopicSnapshots": (types.ListTopicSnapshotsRequest, lambda r: [(_topic(r.topic), "view")]),
    _PUBLISHER + "DetachSubscription": (types.DetachSubscriptionRequest, lambda r: [(_subscription(r.subscription), "admin")]),
    _SUBSCRIBER + "CreateSubscription": (types.Subscription, _create_subscription),
    _SUBSCRIBER + "UpdateSubscription": (
        types.UpdateSubscriptionRequest,
        lambda r: [(_subscription(r.subscription.name), "admin")],
    ),
    _SUBSCRIBER + "DeleteSubscription": (types.DeleteSubscriptionRequest, lambda r: [(_subscription(r.subscription), "admin")]),
    _SUBSCRIBER + "ModifyPushConfig": (types.ModifyPushConfigRequest, lambda r: [(_subscription(r.subscription), "admin")]),
    _SUBSCRIBER + "Seek": (types.SeekRequest, lambda r: [(_subscription(r.subscription), "admin")]),
    _SUBSCRIBER + "GetSubscription": (types.GetSubscriptionRequest, lambda r: [(_subscription(r.subscription), "view")]),
    _SUBSCRIBER + "ListSubscriptions": (types.ListSubscriptionsRequest, lambda r: [("project", "view")]),
    _SUBSCRIBER + "Pull": (types.PullRequest, lambda r: [(_subscription(r.subscription), "consume")]),
    _SUBSCRIBER + "Acknowledge": (types.AcknowledgeRequest, lambda r: [(_subscription(r.subscription), "consume")]),
    _SUBSCRIBER + "ModifyAckDeadline": (types.ModifyAckDeadlineRequest, lambda r: [(_subscription(r.subscription), "consume")]),
    # Only a stream's first request names its subscription; the others carry acks for it.
    _SUBSCRIBER + "StreamingPull": (
        types.StreamingPullRequest,
        lambda r: [(_subscription(r.subscription), "consume")] if r.subscription else [],
    ),
}


def pubsub_uses(method: str, request: bytes) -> list[Recorded]:
    """The (resource, action) pairs one Pub/Sub request needs."""
    known = METHODS.get(method)
    if known is None:
        return [(f"method:{method}", "call")]
    message_type, uses = known
    return uses(message_type.deserialize(request))


def _passable(metadata) -> list[tuple[str, str | bytes]]:
    return [(key, value) for key, value in metadata or () if not key.startswith(_RESERVED) and not key.startswith(":")]


class _Forwarder(grpc.GenericRpcHandler):
    """Every method of every service, forwarded as bytes: no message is re-encoded on the way."""

    def __init__(self, channel: grpc.Channel, record: Callable[[list[Recorded]], None]) -> None:
        self._channel = channel
        self._record = record

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method in STREAMING:
            return grpc.stream_stream_rpc_method_handler(lambda requests, context: self._stream(method, requests, context))
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self._unary(method, request, context))

    @staticmethod
    def _fail(context: grpc.ServicerContext, error: grpc.RpcError):
        """The upstream's status, details and trailing metadata, as the client's own."""
        context.set_trailing_metadata(_passable(error.trailing_metadata()))
        context.abort(error.code(), error.details() or "")

    def _unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record(pubsub_uses(method, request))
        try:
            response, call = self._channel.unary_unary(method).with_call(
                request, timeout=context.time_remaining(), metadata=_passable(context.invocation_metadata())
            )
        except grpc.RpcError as error:
            self._fail(context, error)
        context.send_initial_metadata(_passable(call.initial_metadata()))
        context.set_trailing_metadata(_passable(call.trailing_metadata()))
        return response

    def _stream(self, method: str, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        def recorded(requests: Iterator[bytes]) -> Iterator[bytes]:
            for request in requests:
                self._record(pubsub_uses(method, request))
                yield request

        call = self._channel.stream_stream(method)(
            recorded(requests), timeout=context.time_remaining(), metadata=_passable(context.invocation_metadata())
        )
        context.add_callback(call.cancel)  # the client went away: so does the upstream stream
        try:
            yield from call
        except grpc.RpcError as error:
            self._fail(context, error)
        context.set_trailing_metadata(_passable(call.trailing_metadata()))


class PubSubProxy:
    """A gRPC server on 127.0.0.1:``port`` (0: a free one) forwarding to the emulator at ``upstream`` (host:port);
    ``record(uses)`` is told each request's (resource, action) pairs before it is forwarded."""

    def __init__(self, upstream: str, record: Callable[[list[Recorded]], None], port: int = 0, workers: int = 64) -> None:
        self._channel = grpc.insecure_channel(upstream, options=_UNLIMITED)
        # A streaming pull holds a worker for its whole life: a deployable keeps several open.
        # No SO_REUSEPORT (gRPC's default): a port another server holds must fail here, not be shared.
        self._server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=[*_UNLIMITED, ("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((_Forwarder(self._channel, record),))
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        if not self.port:
            raise OSError(f"the Pub/Sub proxy could not listen on 127.0.0.1:{port}")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> PubSubProxy:
        self._server.start()
        return self

    def stop(self, grace: float = 1) -> None:
        self._server.stop(grace).wait()
        self._channel.close()
