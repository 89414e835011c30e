"""The Open Inference Protocol's GRPCInferenceService, served beside HTTP in each worker process.

Served by our own gRPC transport (`grpc_wire`) on the worker's event loop, over the same state
as the HTTP routes: the same router, batchers, signature checks and limits. `ModelInfer` goes
through the request boundary's core (draining, credentials, request id, in-flight gauge,
deadline, errors, metrics with protocol="grpc", access line), as REST inference does. The
standard health service (`grpc.health.v1`, for Kubernetes gRPC probes) and server reflection
are served too.

Imported only when gRPC is on: the generated module registers the protocol's message names
(`inference.*`) in the process-wide protobuf pool.
"""

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Never, TypeVar, cast

from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError, Message
from grpc import StatusCode
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from service import __version__, errors
from service.protocols import v2
from service.protocols.grpc import infer
from service.protocols.grpc import open_inference_grpc_pb2 as pb
from service.server import access, boundary
from service.server.grpc_status import grpc_code_of
from service.server.grpc_wire import (
    CallContext,
    GrpcConnection,
    Methods,
    Pieces,
    Received,
    Timeouts,
)
from service.server.http import status_of
from service.server.routes import EXTENSIONS, describe_model
from service.server.state import ServiceState

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"
# gRPC carries a call as an HTTP/2 POST to /<service>/<method>: that is its access line's path.
_INFER_PATH = f"/{SERVICE}/ModelInfer"
_QUIET = frozenset({"ServerLive", "ServerReady"})
# A client cancels when its deadline passes, which it counted from before sending: the server's
# copy of the deadline then has a few milliseconds left. A cancel that close is the deadline.
_DEADLINE_SLACK_S = 0.05
T = TypeVar("T")
M = TypeVar("M", bound=Message)
Context = CallContext


def _abort(context: Context, exc: errors.ServiceError, request_id: str) -> Never:
    message = exc.message
    if status_of(exc) >= 500 and not isinstance(exc, errors.Overloaded | errors.ModelNotReady):
        # As over HTTP: a server-side failure names the request, for the operator's log.
        message = f"{message} (request {request_id})"
    context.abort(grpc_code_of(exc), message, ((access.REQUEST_ID.decode(), request_id),))


def _parse(message: type[M], data: Received) -> M:
    try:
        # protobuf reads any buffer; its stubs name bytes only.
        return message.FromString(cast(bytes, data))
    except DecodeError:
        raise errors.InvalidInput(
            f"the message is not a valid {message.DESCRIPTOR.full_name}: its protobuf encoding "
            "is corrupt (or a string in it is not UTF-8)"
        ) from None


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
        data: Received,
        message: type[M],
        answer: Callable[[M], T],
        model_of: Callable[[M], str] | None = None,
    ) -> T:
        """A control-plane call: its message parsed, errors mapped to codes, and its access
        line. A call about a model (`model_of` the message) needs the credentials inference on
        that model needs."""
        started = time.perf_counter()
        metadata = context.metadata
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
            _abort(context, exc, request_id)
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

    async def ServerLive(self, data: Received, context: Context) -> pb.ServerLiveResponse:
        return await self._control(
            context,
            "ServerLive",
            data,
            pb.ServerLiveRequest,
            lambda _: pb.ServerLiveResponse(live=True),
        )

    async def ServerReady(self, data: Received, context: Context) -> pb.ServerReadyResponse:
        return await self._control(
            context,
            "ServerReady",
            data,
            pb.ServerReadyRequest,
            lambda _: pb.ServerReadyResponse(ready=self.state.serving_ready()),
        )

    async def ServerMetadata(self, data: Received, context: Context) -> pb.ServerMetadataResponse:
        return await self._control(
            context,
            "ServerMetadata",
            data,
            pb.ServerMetadataRequest,
            lambda _: pb.ServerMetadataResponse(
                name="modelserve", version=__version__, extensions=EXTENSIONS
            ),
        )

    async def ModelReady(self, data: Received, context: Context) -> pb.ModelReadyResponse:
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

    async def ModelMetadata(self, data: Received, context: Context) -> pb.ModelMetadataResponse:
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

    async def ModelInfer(self, data: Received, context: Context) -> Pieces:
        metadata = context.metadata
        corrupt: errors.InvalidInput | None = None
        data, raws = infer.split_raw_contents(data)
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
            self.state.loop.time(),
            peer=context.peer if self.state.limiter is not None else None,
        )
        if corrupt is not None:  # before credentials: there is no model to check them for
            call.outcome, call.error = status_of(corrupt), type(corrupt).__name__
            boundary.record(call, time.perf_counter() - call.started)
            _abort(context, corrupt, call.request_id)
        # The client's gRPC deadline, as it stands when the call arrives.
        remaining = context.time_remaining()

        async def work() -> Pieces:
            if remaining is not None:
                call.shorten_deadline(remaining)
            # The transport reserved the message in the memory budget as it came, and holds
            # that until the answer has gone: what the budget bounds from here is what an
            # HTTP body's is, its arrays, outputs and answer.
            return await self._infer(call, request, raws, metadata.get("x-routing-key"))

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
            _abort(context, result, call.request_id)
        context.set_trailing_metadata(((access.REQUEST_ID.decode(), call.request_id),))
        # Counted and logged once the answer has gone, as over HTTP: the transport writes it
        # as this returns, before the loop runs what is scheduled.
        self.state.loop.call_soon(boundary.record, call, seconds)
        return result

    async def _infer(
        self,
        call: boundary.Call,
        request: pb.ModelInferRequest,
        raws: list[Received],
        routing_key: str | None,
    ) -> Pieces:
        router = self.state.router
        model = call.model = router.resolve(*call.names, routing_key)
        decoded = infer.decode_infer_request(request, self.state.settings.max_batch_rows, raws)
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
            model, decoded, prediction, wanted, infer.wants_raw(request, decoded, bool(raws))
        )


class HealthService:
    """grpc.health.v1.Health: "" (the server) and the inference service, SERVING or not."""

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {}
        self.changed = asyncio.Event()
        self.stopping = False

    def set(self, status: int) -> None:
        for service in ("", SERVICE):  # "" is the server as a whole, as probes ask by default
            self.statuses[service] = status
        self.changed.set()
        self.changed = asyncio.Event()

    async def Check(self, data: Received, context: Context) -> health_pb2.HealthCheckResponse:
        try:
            service = health_pb2.HealthCheckRequest.FromString(cast(bytes, data)).service
        except DecodeError:
            context.abort(StatusCode.INVALID_ARGUMENT, "not a valid HealthCheckRequest")
        status = self.statuses.get(service)
        if status is None:
            context.abort(StatusCode.NOT_FOUND, f"no service {service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, messages: AsyncIterator[Received], context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        async for data in messages:
            try:
                service = health_pb2.HealthCheckRequest.FromString(cast(bytes, data)).service
            except DecodeError:
                context.abort(StatusCode.INVALID_ARGUMENT, "not a valid HealthCheckRequest")
            break
        else:
            context.abort(StatusCode.INVALID_ARGUMENT, "no HealthCheckRequest")
        last = None
        while True:
            changed = self.changed
            status = self.statuses.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            if self.stopping:  # NOT_SERVING said: the watch ends, so the server can stop
                return
            await changed.wait()


def _reflection(
    servicer: reflection.ReflectionServicer,
) -> Callable[[AsyncIterator[Received], Context], AsyncIterator[Message]]:
    """Server reflection, one answer per question, as grpcurl asks them in turn."""

    async def info(messages: AsyncIterator[Received], context: Context) -> AsyncIterator[Message]:
        async for data in messages:
            try:
                request = reflection_pb2.ServerReflectionRequest.FromString(cast(bytes, data))
            except DecodeError:
                context.abort(StatusCode.INVALID_ARGUMENT, "not a valid ServerReflectionRequest")
            yield next(iter(servicer.ServerReflectionInfo(iter([request]), cast(Any, None))))

    return info


def _methods(service: InferenceService, health: HealthService) -> Methods:
    methods = Methods()
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        handler = getattr(service, method.name, None)
        if handler is not None:
            methods.unary[f"/{SERVICE}/{method.name}".encode()] = handler
    methods.unary[f"/{HEALTH}/Check".encode()] = health.Check
    methods.streaming[f"/{HEALTH}/Watch".encode()] = health.Watch
    served = (SERVICE, HEALTH, reflection.SERVICE_NAME)
    info = _reflection(reflection.ReflectionServicer(served, pool=_reflection_pool()))
    methods.streaming[f"/{reflection.SERVICE_NAME}/ServerReflectionInfo".encode()] = info
    return methods


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    """The running gRPC server of one worker, and its health service to flip on draining."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.health = HealthService()
        self.health.set(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.methods = _methods(InferenceService(state), self.health)
        self.connections: set[GrpcConnection] = set()
        self._loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        settings = state.settings
        self.address = _address(settings.host, settings.grpc_port)

    def _connection(self) -> GrpcConnection:
        settings = self.state.settings
        return GrpcConnection(
            self.methods,
            self.state.memory,
            # The request limit of HTTP bodies holds for messages (gRPC caps them at 2 GiB).
            min(settings.max_request_bytes, 2**31 - 1 - 5),
            settings.max_header_bytes,
            self.connections,
        )

    async def start(self) -> None:
        settings = self.state.settings
        # Every worker process binds the same port (SO_REUSEPORT); the kernel spreads
        # connections among them.
        self._server = await self._loop.create_server(
            self._connection,
            settings.host,
            settings.grpc_port,
            reuse_port=True,
            family=socket.AF_INET6 if ":" in settings.host else socket.AF_INET,
            backlog=2048,
        )
        self._sweeper = asyncio.create_task(self._sweep())
        logger.info("gRPC listening on %s", self.address)

    async def _sweep(self) -> None:
        settings = self.state.settings
        limits = Timeouts(
            settings.header_timeout_s, settings.body_idle_timeout_s, settings.request_timeout_s
        )
        while True:
            await asyncio.sleep(min(1.0, *(seconds / 4 for seconds in vars(limits).values())))
            now = self._loop.time()
            for connection in list(self.connections):
                try:
                    connection.expire(now, limits)
                except Exception:  # one connection's fault must not end every timeout
                    logger.exception("gRPC connection from %s: expiring failed", connection.peer)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set(status)

    def drain(self) -> None:
        """Health answers NOT_SERVING from now on; safe to call from a signal handler."""
        self._loop.call_soon_threadsafe(self.health.set, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, give the running ones `grace_s` seconds, then cancel them."""
        self.health.stopping = True
        await self.set_serving(False)
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.connections):
            connection.go_away()
        deadline = self._loop.time() + grace_s
        while any(c.streams for c in self.connections) and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.close()


async def start_grpc_server(state: ServiceState) -> GrpcServer:
    server = GrpcServer(state)
    await server.start()
    return server
