"""modelserve serve | score | validate | package | convert | route | profile: the command line."""

import argparse
import contextlib
import gc
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from service import jobclient
from service.config import Settings, usable_cores
from service.observability.logs import configure_logging

if TYPE_CHECKING:  # pyarrow is imported only by the commands that score
    from service.scoring.columns import ColumnTypes

logger = logging.getLogger(__name__)
# A repository holding this file is the bundled example one: its artifacts are built, not shipped.
EXAMPLES_MARKER = ".examples"


def _serve(args: argparse.Namespace) -> int:
    # Flags become environment variables so that every worker process builds the same Settings.
    for flag in ("model_repository", "model_name", "host", "port", "grpc_port", "workers"):
        value = getattr(args, flag)
        if value is not None:
            os.environ[f"MODELSERVE_{flag.upper()}"] = str(value)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format, settings.access_log)
    # SIGTERM is how orchestrators stop a server: it ends with exit status 0. uvicorn takes the
    # signal over while it serves, drains, and then raises it again, which lands here.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    taken = _port_taken(settings.host, settings.grpc_port) if settings.grpc_port else None
    if taken is not None:
        logger.error(
            "the gRPC port %s on %s is in use (%s): another server holds it; pass --grpc-port "
            "(MODELSERVE_GRPC_PORT) with a free port, or 0 to serve no gRPC",
            settings.grpc_port,
            settings.host,
            taken,
        )
        return 3
    root = settings.model_repository
    if (root / EXAMPLES_MARKER).is_file():
        from training.examples import examples_missing, train_examples

        if examples_missing(root):
            logger.info("training the example models into %s", root)
            train_examples(root)
    import uvicorn

    from service.observability.exposition import worker_metrics
    from service.server.connection import HeadLimits, http_protocol

    with worker_metrics(settings.workers):
        uvicorn.run(
            "service.server.main:app_from_environment",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            # Named rather than "auto": a missing uvicorn[standard] then fails loudly instead of
            # silently falling back to the slower asyncio loop and pure-Python HTTP parser.
            # The HTTP protocol is uvicorn's httptools one, with bounded request heads.
            loop="uvloop",
            http=http_protocol(HeadLimits(settings.max_header_bytes, settings.header_timeout_s)),
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=settings.graceful_shutdown_s,
        )
    return 0


def _port_taken(host: str, port: int) -> str | None:
    """Why `port` cannot be listened on, if it cannot: a bind without SO_REUSEPORT.

    The workers bind the gRPC port with SO_REUSEPORT, so that they share it; the kernel would
    let a second, unrelated server share it just as silently and split the calls between the
    two. Checked once, before the workers start.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            # A previous server's connections in TIME_WAIT do not hold the port; a listener does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
            probe.listen()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _stop(signum: int, frame: FrameType | None) -> None:
    """SIGTERM on a command other than serve: unwind, so that its `finally` blocks clean up
    (a half-scored file's parts), then exit with the status a shell expects."""
    raise SystemExit(128 + signum)


def _validate(args: argparse.Namespace) -> int:
    from service.store.profiles import profile_problem
    from service.store.registry import load_registry
    from service.store.samples import sample_problem

    settings = Settings() if args.model_name is None else Settings(model_name=args.model_name)
    configure_logging(settings.log_level, settings.log_format, settings.access_log)
    root = args.model_repository or settings.model_repository
    registry = load_registry(root, settings.load_options())
    problems = 0
    for name, entry in sorted(registry.models.items()):
        for number, model in sorted(entry.versions.items()):
            notes = f" ({'; '.join(model.warnings)})" if model.warnings else ""
            print(f"ok    {name}:{number} {model.format} sha256={model.sha256[:12]}{notes}")
            for what, check in (("reference sample", sample_problem), ("profile", profile_problem)):
                problem = model.metadata and check(model.artifact.parent, model.metadata)
                if problem:
                    problems += 1
                    print(f"FAIL  {name}:{number} {what}: {problem}")
        for number, failure in sorted(entry.failures.items()):
            problems += 1
            print(f"FAIL  {name}:{number} {failure.reason}: {failure.message}")
        if entry.config_error:
            problems += 1
            print(f"FAIL  {name}: model.toml: {entry.config_error}")
    if not registry.models:
        print(f"FAIL  no models in {root}")
        return 1
    return 1 if problems else 0


def _package(args: argparse.Namespace) -> int:
    from service.errors import ServiceError
    from service.store.packaging import package_artifact

    root = args.model_repository or Settings().model_repository
    features = args.features.split(",") if args.features else None
    try:
        packaged = package_artifact(
            args.artifact,
            root,
            args.name,
            args.version,
            features=features,
            task=args.task,
            allow_nan=args.allow_nan,
            allow_signature_change=args.allow_signature_change,
        )
    except ServiceError as exc:
        return _fail(exc.message)
    except OSError as exc:
        return _fail(str(exc))
    failure = None
    if args.data is not None:
        try:
            _store_training_rows(packaged.folder, args.data)
        except ServiceError as exc:
            failure = exc.message
        except OSError as exc:
            failure = str(exc)
    if failure is not None:
        # Nothing half-made stays behind for a server's polling or a load to pick up.
        shutil.rmtree(packaged.folder)
        with contextlib.suppress(OSError):
            packaged.folder.parent.rmdir()  # a model folder this command created, now empty
        _fail(failure)
    for note in packaged.notes:
        print(f"note: {note}", file=sys.stderr)
    if failure is not None:
        return 1
    print(f"packaged {args.artifact} as {packaged.folder}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from service.errors import ServiceError
    from service.store.repository import model_dir, parse_version
    from service.store.signing import sign_version

    root = args.model_repository or Settings().model_repository
    name, _, version = args.model.partition(":")
    number = parse_version(version)
    if number is None:
        return _fail("name the version to sign by its number: MODEL:VERSION")
    try:
        folder = model_dir(root, name) / str(number)
        if not (folder / "metadata.json").is_file():
            return _fail(f"{folder} has no metadata.json to sign; run `modelserve package` first")
        signer = sign_version(folder, args.key)
    except ServiceError as exc:
        return _fail(exc.message)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    print(f"signed {name}:{number} with key {signer} ({folder / 'signature.json'})")
    return 0


def _store_training_rows(folder: Path, data: Path) -> None:
    """A reference sample and a reference profile of a packaged version, from `data`."""
    from service.store.metadata import ArtifactMetadata
    from service.store.profiles import profile_version
    from service.store.samples import read_sample_file, store_reference_sample

    metadata = ArtifactMetadata.read(folder / "metadata.json")
    matrix = read_sample_file(data, metadata.features, metadata.allow_nan)
    store_reference_sample(folder, matrix)
    profile_version(folder, matrix, Settings().allow_unverified_pickle)


def _fail(message: str) -> int:
    """One `error:` line, whatever the message held (an exporter's error may span lines)."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _profile(args: argparse.Namespace) -> int:
    from service.errors import InvalidInput, ModelNotFound, ServiceError
    from service.store.conversion import resolve_version
    from service.store.metadata import ArtifactMetadata
    from service.store.profiles import profile_version
    from service.store.repository import model_dir
    from service.store.samples import read_sample_file

    settings = Settings()
    root = args.model_repository or settings.model_repository
    name, _, version = args.model.partition(":")
    if not version:
        print(
            "error: name the version to profile: MODEL:VERSION (a number or alias)", file=sys.stderr
        )
        return 2
    try:
        folder = model_dir(root, name)
        if not folder.is_dir():
            raise ModelNotFound(f"model {name!r} is not in {root}")
        version_dir = folder / str(resolve_version(folder, version))
        if not (version_dir / "metadata.json").is_file():
            raise InvalidInput(f"{version_dir} has no metadata.json; package the artifact first")
        metadata = ArtifactMetadata.read(version_dir / "metadata.json")
        if not metadata.features:
            raise InvalidInput(
                f"{version_dir}/metadata.json declares no feature names; repackage with --features"
            )
        matrix = read_sample_file(args.data, metadata.features, metadata.allow_nan)
        info = profile_version(version_dir, matrix, settings.allow_unverified_pickle)
    except ServiceError as exc:
        print(f"error: {' '.join(exc.message.split())}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"profiled {name}:{version_dir.name} on {info.rows} rows: {version_dir / info.file}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from service.errors import ServiceError
    from service.store.conversion import convert_version

    root = args.model_repository or Settings().model_repository
    name, _, version = args.model.partition(":")
    if not version:
        print(
            "error: name the version to convert: MODEL:VERSION (a number or alias)", file=sys.stderr
        )
        return 2
    try:
        conversion = convert_version(
            root,
            name,
            version,
            sample_file=args.sample,
            new_version=args.version,
            tolerance=args.tolerance,
        )
    except ServiceError as exc:
        print(f"error: {' '.join(exc.message.split())}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    parity = conversion.parity
    if conversion.folder is None:
        print(f"error: {conversion.refusal()}", file=sys.stderr)
        print("first disagreeing rows (scikit-learn → ONNX):", file=sys.stderr)
        for row in parity.first:
            print(f"  row {row.row}: {row.source} → {row.converted}", file=sys.stderr)
        return 1
    figures = parity.figures
    if figures.max_relative_prediction_difference is not None:
        agreement = f"max relative difference {figures.max_relative_prediction_difference:.3g}"
    else:
        agreement = "labels identical"
        if figures.max_abs_probability_difference is not None:
            agreement += (
                f", max probability difference {figures.max_abs_probability_difference:.3g}"
            )
    print(
        f"converted {conversion.source} to {conversion.target} ({conversion.folder}): "
        f"{figures.rows} rows of {figures.sample}, {agreement} (tolerance {figures.tolerance:g})"
    )
    return 0


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a number, 0 or more")
    return value


def _score(args: argparse.Namespace) -> int:
    from service.errors import ServiceError
    from service.protocols.files import format_of_path
    from service.scoring import ModelReference
    from service.scoring.files import score_file
    from service.scoring.parts import ScoreFile
    from service.scoring.progress import ProgressBar

    settings = Settings()
    configure_logging("warning", settings.log_format)
    root = args.model_repository or settings.model_repository
    input_format = args.format or format_of_path(args.input)
    if input_format is None:
        print(f"error: cannot tell the format of {args.input}; pass --format", file=sys.stderr)
        return 2
    if not args.input.is_file():
        print(f"error: {args.input} is not a file", file=sys.stderr)
        return 1
    job = ScoreFile(
        reference=ModelReference.parse(root, args.model),
        source=args.input,
        target=args.output,
        input_format=input_format,
        output_format=args.output_format or format_of_path(args.output) or input_format,
        chunk_rows=args.chunk_rows,
        workers=args.workers or usable_cores(),
        on_error=args.on_error,
        column_types=args.column_types or {},
        max_row_bytes=settings.max_row_bytes,
    )
    bar = ProgressBar(args.input.stat().st_size, sys.stderr)
    try:
        rows = score_file(job, bar)
    except ServiceError as exc:
        print(f"\nerror: {exc.message}" if bar.drawn else f"error: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if sys.stderr.isatty():
        print(f"scored {rows:,} rows into {args.output}", file=sys.stderr)
    return 0


def _route(args: argparse.Namespace) -> int:
    import json

    from service.control import ControlError, RoutingFlags, parse_pairs, route

    try:
        aliases = {k: int(v) for k, v in parse_pairs(",".join(args.alias)).items()}
        traffic = None
        if args.no_traffic:
            traffic = {}
        elif args.traffic is not None:
            traffic = {int(k): float(v) for k, v in parse_pairs(args.traffic).items()}
        shadow = None
        if args.shadow is not None:
            parts = args.shadow.split(":")
            if len(parts) not in (2, 3):
                raise ValueError("--shadow takes SOURCE:TARGET or SOURCE:TARGET:FRACTION")
            fraction = float(parts[2]) if len(parts) == 3 else 1.0
            shadow = (int(parts[0]), int(parts[1]), fraction)
        flags = RoutingFlags(
            args.default, aliases, args.remove_alias, traffic, shadow, args.no_shadow
        )
        action = "load" if args.load else "unload" if args.unload else None
        token = args.token or os.environ.get("MODELSERVE_ADMIN_TOKEN")
        answer = route(args.url, args.model, token, flags, action)
    except ValueError as exc:  # a flag's value that does not parse: a usage error
        print(f"error: {exc} (see `modelserve route --help`)", file=sys.stderr)
        return 2
    except ControlError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def _column_types(text: str) -> "ColumnTypes":
    from service.errors import InvalidInput
    from service.scoring.columns import parse_column_types

    try:
        return parse_column_types(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("must be a positive whole number")
    return int(text)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one `error:` line, exit status 2, like every other failure."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _repository_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-repository",
        type=Path,
        metavar="DIR",
        help="the repository folder (default: MODELSERVE_MODEL_REPOSITORY or models)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modelserve", description="Serve scikit-learn and ONNX models.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the model repository over HTTP")
    serve.add_argument("--model-repository", type=Path)
    serve.add_argument("--model-name", help="serve the repository folder as this one model")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 8001; 0: off)")
    serve.add_argument("--workers", type=int)
    serve.set_defaults(run=_serve)

    validate = commands.add_parser("validate", help="load every version, check hashes, smoke-test")
    validate.add_argument("--model-repository", type=Path)
    validate.add_argument("--model-name", help="validate the repository folder as this one model")
    validate.set_defaults(run=_validate)

    formats = ["csv", "ndjson", "parquet"]
    score = commands.add_parser("score", help="score a CSV, NDJSON or Parquet file offline")
    score.add_argument("model", metavar="MODEL[:VERSION]", help="a version number or alias")
    score.add_argument("input", type=Path, metavar="INPUT")
    score.add_argument("output", type=Path, metavar="OUTPUT")
    score.add_argument("--model-repository", type=Path)
    score.add_argument("--format", choices=formats, help="of INPUT (default: from its suffix)")
    score.add_argument(
        "--output-format", choices=formats, help="of OUTPUT (default: its suffix, else INPUT's)"
    )
    score.add_argument("--chunk-rows", type=_positive, default=65536, help="rows per model call")
    score.add_argument("--workers", type=_positive, help="processes (default: one per core)")
    score.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    score.add_argument(
        "--column-types",
        type=_column_types,
        metavar="NAME:TYPE,...",
        help="types of columns in the output, e.g. id:int64,day:date32 (default: CSV cells stay "
        "text, features are numbers)",
    )
    score.set_defaults(run=_score)

    package = commands.add_parser(
        "package",
        help="add an artifact to the repository",
        description="Copy a scikit-learn (joblib/pickle) or ONNX artifact into the repository "
        "as a new version of a model and write its metadata.json (signature, feature names, "
        "classes, sha256, framework versions).",
    )
    package.add_argument(
        "artifact", type=Path, metavar="ARTIFACT", help="a .joblib, .pkl or .onnx file"
    )
    package.add_argument(
        "--name", required=True, metavar="N", help="the model's name in the repository"
    )
    package.add_argument(
        "--version",
        type=_positive,
        metavar="V",
        help="the version number (default: the next free one)",
    )
    _repository_option(package)
    package.add_argument(
        "--features",
        metavar="A,B,…",
        help="comma-separated feature names, in column order (default: the model's own, else "
        "those of another version with as many features, else x0, x1, …)",
    )
    package.add_argument(
        "--task",
        choices=["classification", "regression", "other"],
        help="for an ONNX graph that is not a recognised scikit-learn export: regression "
        "serves its one output as `prediction`",
    )
    package.add_argument(
        "--allow-nan",
        action="store_true",
        help="accept NaN and infinite feature values (for models that handle missing values, "
        "such as HistGradientBoosting); by default requests holding them are refused",
    )
    package.add_argument(
        "--allow-signature-change",
        action="store_true",
        help="accept an input name or feature count that differs from the model's other "
        "versions (clients of the default version or an alias will see the change)",
    )
    package.add_argument(
        "--data",
        type=Path,
        metavar="FILE",
        help="training rows (a CSV or Parquet file with the feature columns): stored as the "
        "version's reference sample and reference profile (what drift is measured against)",
    )
    package.set_defaults(run=_package)

    route = commands.add_parser(
        "route",
        help="show or change a model's routing on a running server",
        description="Without options, print the model's routing (default version, aliases, "
        "traffic split, shadow, and what each worker serves). With options, change it: the "
        "change is written to the model's model.toml and reaches every worker and replica "
        "within MODELSERVE_ROUTING_SYNC_S. Needs the admin token.",
    )
    route.add_argument("model", metavar="MODEL")
    route.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    route.add_argument("--token", help="admin token (default: MODELSERVE_ADMIN_TOKEN)")
    route.add_argument("--default", type=_positive, metavar="V", help="set the default version")
    route.add_argument(
        "--alias", action="append", default=[], metavar="NAME=V", help="point an alias at V"
    )
    route.add_argument(
        "--remove-alias", action="append", default=[], metavar="NAME", help="remove an alias"
    )
    split = route.add_mutually_exclusive_group()
    split.add_argument(
        "--traffic",
        metavar="V=W,…",
        help="split unversioned requests by weight, e.g. 2=90,3=10",
    )
    split.add_argument("--no-traffic", action="store_true", help="remove the split")
    shadow = route.add_mutually_exclusive_group()
    shadow.add_argument(
        "--shadow",
        metavar="SOURCE:TARGET[:FRACTION]",
        help="mirror a fraction (default 1) of SOURCE's requests to TARGET and compare",
    )
    shadow.add_argument("--no-shadow", action="store_true", help="stop mirroring")
    load = route.add_mutually_exclusive_group()
    load.add_argument("--load", action="store_true", help="load the model (new versions too)")
    load.add_argument("--unload", action="store_true", help="unload the model")
    route.set_defaults(run=_route)

    convert = commands.add_parser(
        "convert",
        help="convert a scikit-learn version to a new ONNX version, checked for parity",
        description="Convert a scikit-learn (joblib/pickle) version to ONNX with skl2onnx and "
        "add it as a new version, with the same features, classes and canonical tensors. The "
        "ONNX version must answer a reference sample as the source does (every label "
        "identical; probabilities, or regressors' predictions relatively, within --tolerance); "
        "otherwise nothing is written and the first disagreeing rows are shown.",
    )
    convert.add_argument(
        "model", metavar="MODEL:VERSION", help="the version to convert: a number or an alias"
    )
    _repository_option(convert)
    convert.add_argument(
        "--version",
        type=_positive,
        metavar="NEW",
        help="the new version's number (default: the next free one)",
    )
    convert.add_argument(
        "--sample",
        type=Path,
        metavar="FILE",
        help="a CSV or Parquet file with the feature columns to check parity on (default: "
        "the reference sample stored with the version by training)",
    )
    convert.add_argument(
        "--tolerance",
        type=_tolerance,
        metavar="T",
        help="largest accepted absolute probability difference, or relative prediction "
        "difference for regressors (default: 1e-5)",
    )
    convert.set_defaults(run=_convert)

    sign = commands.add_parser(
        "sign",
        help="sign a version with an Ed25519 private key",
        description="Sign a version's metadata.json (which carries its artifact's sha256) with "
        "an Ed25519 private key (PEM, unencrypted; `openssl genpkey -algorithm ed25519`), "
        "writing signature.json beside it. Servers with the public key in "
        "MODELSERVE_TRUSTED_KEYS load the version only if the signature matches.",
    )
    sign.add_argument("model", metavar="MODEL:VERSION", help="the version to sign (a number)")
    sign.add_argument("--key", type=Path, required=True, metavar="KEY.pem", help="private key")
    _repository_option(sign)
    sign.set_defaults(run=_sign)

    profile = commands.add_parser(
        "profile",
        help="write a version's reference profile (what live drift is measured against)",
        description="Bin each feature of a sample of training rows at its deciles, note the "
        "share of missing values, min and max, and the model's predicted class shares "
        "(classifiers) or prediction deciles (regressors); write them beside the artifact as "
        "profile.json, with its sha256 in metadata.json. Training writes it for the examples.",
    )
    profile.add_argument(
        "model", metavar="MODEL:VERSION", help="the version to profile: a number or an alias"
    )
    profile.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="FILE",
        help="a CSV or Parquet file with the feature columns (other columns are ignored)",
    )
    _repository_option(profile)
    profile.set_defaults(run=_profile)
    jobclient.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)  # `serve` puts its own in place
    try:
        code: int = args.run(args)
        sys.stdout.flush()  # a pipe's buffer: written here, where a closed pipe is handled
    except KeyboardInterrupt:  # Ctrl-C: what was cleaned up in `finally` blocks, no traceback
        print("\nmodelserve: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # the reader of stdout left (`| head`): nothing more to say
        # Python flushes stdout again at exit; pointed at /dev/null, that flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    # The interpreter's last collections walk every object the imports made (numpy, pyarrow,
    # pydantic...): about 50 ms of each command's exit, which frozen objects are spared.
    gc.freeze()
    return code
