"""The Open Inference Protocol's GRPCInferenceService, served beside HTTP in each worker process.

A `grpc.aio` server on the worker's event loop, over the same state as the HTTP routes: the
same router, batchers, signature checks and limits. `ModelInfer` goes through the request
boundary's core (draining, credentials, request id, in-flight gauge, deadline, errors, metrics
with protocol="grpc", access line), as REST inference does. The standard health service
(`grpc.health.v1`, for Kubernetes gRPC probes) and server reflection are served too.

Imported only when gRPC is on: the generated module registers the protocol's message names
(`inference.*`) in the process-wide protobuf pool.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Never, TypeVar, cast

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError, Message
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from service import __version__, errors
from service.protocols import v2
from service.protocols.grpc import infer
from service.protocols.grpc import open_inference_grpc_pb2 as pb
from service.server import access, boundary
from service.server.grpc_status import grpc_code_of
from service.server.http import status_of
from service.server.routes import EXTENSIONS, describe_model
from service.server.state import ServiceState

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
# gRPC carries a call as an HTTP/2 POST to /<service>/<method>: that is its access line's path.
_INFER_PATH = f"/{SERVICE}/ModelInfer"
_QUIET = frozenset({"ServerLive", "ServerReady"})
# A client cancels when its deadline passes, which it counted from before sending: the server's
# copy of the deadline then has a few milliseconds left. A cancel that close is the deadline.
_DEADLINE_SLACK_S = 0.05
T = TypeVar("T")
M = TypeVar("M", bound=Message)
Context = aio.ServicerContext[object, object]


def _peer_host(context: Context) -> str:
    # "ipv4:127.0.0.1:52044", "ipv6:[::1]:52044": the host, without the port.
    peer = context.peer() or "unknown"
    return peer.rpartition(":")[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


def _metadata(context: Context) -> dict[str, str]:
    return {
        key: value
        for key, value in context.invocation_metadata() or ()
        if isinstance(value, str)  # binary (-bin) entries carry nothing we read
    }


async def _abort(context: Context, exc: errors.ServiceError, request_id: str) -> Never:
    message = exc.message
    if status_of(exc) >= 500 and not isinstance(exc, errors.Overloaded | errors.ModelNotReady):
        # As over HTTP: a server-side failure names the request, for the operator's log.
        message = f"{message} (request {request_id})"
    await context.abort(grpc_code_of(exc), message, ((access.REQUEST_ID.decode(), request_id),))


class _ClientLeft(logging.Filter):
    """gRPC logs an answer it could not send because the client had left (or reset the call)
    as an error with a traceback; it is the client's doing: one line, at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("ExecuteBatchError raised in core by servicer method"):
            return True
        if not logger.isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        record.msg, record.args = "%s: the client left before its answer was sent", (message,)
        return True


_CLIENT_LEFT = _ClientLeft()


def _parse(message: type[M], data: bytes) -> M:
    try:
        return message.FromString(data)
    except DecodeError:
        raise errors.InvalidInput(
            f"the message is not a valid {message.DESCRIPTOR.full_name}: its protobuf encoding "
            "is corrupt (or a string in it is not UTF-8)"
        ) from None


def _add_service(servicer: "InferenceService", server: aio.Server) -> None:
    """As the generated add_GRPCInferenceServiceServicer_to_server, except that each method
    takes its message's bytes and parses them itself: gRPC would answer a corrupt message with
    UNKNOWN and log a traceback for each, where it is the client's INVALID_ARGUMENT."""
    methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """Our messages' own pool (see scripts/grpc_stubs.sh), with the health and reflection
    services' files added, so that reflection describes every service it lists."""
    pool = pb.POOL
    for module in (health_pb2, reflection_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


class InferenceService:
    """The service's methods, each given its message's bytes (see _add_service)."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    async def _control(
        self,
        context: Context,
        method: str,
        data: bytes,
        message: type[M],
        answer: Callable[[M], T],
        model_of: Callable[[M], str] | None = None,
    ) -> T:
        """A control-plane call: its message parsed, errors mapped to codes, and its access
        line. A call about a model (`model_of` the message) needs the credentials inference on
        that model needs."""
        started = time.perf_counter()
        metadata = _metadata(context)
        request_id = access.request_id_from(metadata.get("x-request-id"))
        status, error = 200, None
        try:
            request = _parse(message, data)
            if model_of is not None:
                await self.state.credentials.check_inference(
                    metadata.get("authorization"), metadata.get("x-api-key"), model_of(request)
                )
            return answer(request)
        except errors.ServiceError as exc:
            status, error = status_of(exc), type(exc).__name__
            await _abort(context, exc, request_id)
        finally:
            access.log_request(
                request_id,
                "POST",
                f"/{SERVICE}/{method}",
                status,
                time.perf_counter() - started,
                protocol="grpc",
                error=error,
                level=logging.DEBUG if method in _QUIET else logging.INFO,
            )

    async def ServerLive(self, data: bytes, context: Context) -> pb.ServerLiveResponse:
        return await self._control(
            context,
            "ServerLive",
            data,
            pb.ServerLiveRequest,
            lambda _: pb.ServerLiveResponse(live=True),
        )

    async def ServerReady(self, data: bytes, context: Context) -> pb.ServerReadyResponse:
        return await self._control(
            context,
            "ServerReady",
            data,
            pb.ServerReadyRequest,
            lambda _: pb.ServerReadyResponse(ready=self.state.serving_ready()),
        )

    async def ServerMetadata(self, data: bytes, context: Context) -> pb.ServerMetadataResponse:
        return await self._control(
            context,
            "ServerMetadata",
            data,
            pb.ServerMetadataRequest,
            lambda _: pb.ServerMetadataResponse(
                name="modelserve", version=__version__, extensions=EXTENSIONS
            ),
        )

    async def ModelReady(self, data: bytes, context: Context) -> pb.ModelReadyResponse:
        def answer(request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
            try:
                self.state.router.resolve(request.name, request.version or None)
            except (errors.ModelNotFound, errors.ModelNotReady):
                # The question has an answer, as tritonclient.http's is_model_ready gives it.
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        return await self._control(
            context, "ModelReady", data, pb.ModelReadyRequest, answer, lambda r: r.name
        )

    async def ModelMetadata(self, data: bytes, context: Context) -> pb.ModelMetadataResponse:
        def answer(request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
            registry = self.state.registry
            model = registry.resolve(request.name, request.version or None)
            versions = sorted(registry.model(request.name).versions)
            described = describe_model(model, versions if not request.version else [model.version])
            response = pb.ModelMetadataResponse(
                name=described.name, versions=described.versions, platform=described.platform
            )
            for spec in described.inputs:
                response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            for spec in described.outputs:
                response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            return response

        return await self._control(
            context, "ModelMetadata", data, pb.ModelMetadataRequest, answer, lambda r: r.name
        )

    async def ModelInfer(self, data: bytes, context: Context) -> pb.ModelInferResponse:
        metadata = _metadata(context)
        corrupt: errors.InvalidInput | None = None
        try:
            request = _parse(pb.ModelInferRequest, data)
        except errors.InvalidInput as exc:  # answered below, once the call is counted
            request, corrupt = pb.ModelInferRequest(), exc
        call = boundary.Call(
            self.state,
            "grpc",
            (request.model_name, request.model_version or None),
            access.request_id_from(metadata.get("x-request-id")),
            "POST",
            _INFER_PATH,
            asyncio.get_running_loop().time(),
            peer=_peer_host(context) if self.state.limiter is not None else None,
        )
        if corrupt is not None:  # before credentials: there is no model to check them for
            call.outcome, call.error = status_of(corrupt), type(corrupt).__name__
            boundary.record(call, time.perf_counter() - call.started)
            await _abort(context, corrupt, call.request_id)
        # The client's gRPC deadline, as it stands when the call arrives.
        remaining = context.time_remaining()

        async def work() -> pb.ModelInferResponse:
            if remaining is not None:
                call.shorten_deadline(remaining)
            return await self._infer(
                call, request, len(data), metadata.get("x-routing-key"), context
            )

        try:
            result = await boundary.run(
                call, metadata.get("authorization"), metadata.get("x-api-key"), work
            )
        except asyncio.CancelledError:
            # gRPC cancels the call when its deadline passes or the client goes away; the
            # call is still counted and logged, as one the server could not answer.
            left = context.time_remaining()
            late = remaining is not None and (left is None or left < _DEADLINE_SLACK_S)
            call.outcome, call.error = (504, "DeadlineExceeded") if late else (499, "Cancelled")
            boundary.record(call, time.perf_counter() - call.started)
            raise
        seconds = time.perf_counter() - call.started
        if isinstance(result, errors.ServiceError):
            call.outcome = status_of(result)
            boundary.record(call, seconds)
            await _abort(context, result, call.request_id)
        boundary.record(call, seconds)
        context.set_trailing_metadata(((access.REQUEST_ID.decode(), call.request_id),))
        return result

    async def _infer(
        self,
        call: boundary.Call,
        request: pb.ModelInferRequest,
        size: int,
        routing_key: str | None,
        context: Context,
    ) -> pb.ModelInferResponse:
        reservation = self.state.memory.reservation()
        try:
            # gRPC hands over the message whole, so it is reserved for at once; what the budget
            # bounds from here is what an HTTP body's is: its arrays, outputs and answer.
            reservation.grow(size)
            answer = await self._infer_reserved(call, request, routing_key)
        except BaseException:
            reservation.release()
            raise
        # gRPC sends the answer after this returns, as fast as the client reads it: one that
        # does not read would hold answers outside the budget. Held until the call ends.
        # (The stubs type a callback as a class of their own, which no function is.)
        context.add_done_callback(cast(Any, lambda _: reservation.release()))
        return answer

    async def _infer_reserved(
        self, call: boundary.Call, request: pb.ModelInferRequest, routing_key: str | None
    ) -> pb.ModelInferResponse:
        router = self.state.router
        model = call.model = router.resolve(*call.names, routing_key)
        decoded = infer.decode_infer_request(request, self.state.settings.max_batch_rows)
        key = decoded.parameters.get("routing_key")
        if key is not None:
            if not isinstance(key, str):
                raise errors.InvalidInput("parameters.routing_key must be a string")
            # As over HTTP: the split is by key, so a key in the request decides.
            model = call.model = router.resolve(*call.names, key)
        first = next(iter(decoded.tensors.values()))
        call.rows = first.shape[0] if first.ndim else 1
        timeout_s = v2.requested_timeout_s(decoded)
        if timeout_s is not None:
            call.shorten_deadline(timeout_s)
        wanted = v2.select_outputs(model, decoded)
        prediction = await router.predict(model, decoded.tensors, call.request_id)
        return infer.encode_infer_response(
            model, decoded, prediction, wanted, infer.wants_raw(request, decoded)
        )


MAX_STREAMS = 1000


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    """The running gRPC server of one worker, and its health service to flip on draining."""

    def __init__(self, state: ServiceState) -> None:
        settings = state.settings
        self.server = aio.server(
            options=[
                # The request limit of HTTP bodies holds for messages (gRPC caps it at 2 GiB).
                ("grpc.max_receive_message_length", min(settings.max_request_bytes, 2**31 - 1)),
                ("grpc.max_send_message_length", -1),
                # Every worker process binds the same port; the kernel spreads connections.
                ("grpc.so_reuseport", 1),
                # Calls in flight per connection. gRPC's Python server answers nothing to a
                # call that ends without its message (until its deadline or the client leaves):
                # 4,000 such calls on one connection held 78 MB, at most 1,000 of them 20 MB.
                # Past the limit a client's gRPC queues its calls; a burst sent before it learns
                # the limit is refused with UNAVAILABLE (it was CANCELLED past ~1,000 without it).
                ("grpc.max_concurrent_streams", MAX_STREAMS),
            ]
        )
        _add_service(InferenceService(state), self.server)
        logging.getLogger("grpc._cython.cygrpc").addFilter(_CLIENT_LEFT)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            self.server,
            _reflection_pool(),
        )
        self._draining: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self.address = _address(settings.host, settings.grpc_port)
        self.port = self.server.add_insecure_port(self.address)

    async def start(self) -> None:
        await self.server.start()
        logger.info("gRPC listening on %s", self.address)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        for service in ("", SERVICE):  # "" is the server as a whole, as probes ask by default
            await self.health.set(service, status)

    def drain(self) -> None:
        """Health answers NOT_SERVING from now on; safe to call from a signal handler."""
        self._loop.call_soon_threadsafe(self._start_draining)

    def _start_draining(self) -> None:
        self._draining = asyncio.create_task(self.set_serving(False))

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, give the running ones `grace_s` seconds, then cancel them."""
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def start_grpc_server(state: ServiceState) -> GrpcServer:
    server = GrpcServer(state)
    await server.set_serving(False)
    await server.start()
    return server
