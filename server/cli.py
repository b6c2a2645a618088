"""`kiln`: serve models, manage them on a running server, generate one image, build tiny checkpoints.

The management commands mirror Xinference's CLI (`launch`, `list`, `terminate`, with the same coercion of extra
`--key value` launch options), so scripts written for `xinference` port by changing the program name. Every
client-side command talks HTTP through `server.client`, never to the engine directly; only `serve` and `tiny`
import torch (lazily), so the client commands start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import uuid
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import httpx

from kiln.engine.catalogue import CATALOGUE, DEFAULT_OCR_MODEL, OCR_CATALOGUE
from kiln.server.client import Client, ImageModelHandle, KilnError

DEFAULT_ENDPOINT = "http://127.0.0.1:9997"
PROGRESS_POLL_SECONDS = 0.2
LAUNCH_POLL_SECONDS = 0.2
_SUFFIX_FORMATS = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


# --- launch options, coerced as Xinference's CLI does ----------------------------------------------------------
def coerce_option(value: str) -> Any:
    """Turn a command-line string into the JSON value Xinference's `handle_click_args_type` would send.

    `None` -> null, `True`/`true`/`False`/`false` -> bool, then int, then float, then JSON for `{...}`/`[...]`;
    anything else (including JSON that does not parse) stays a string.
    """
    if value == "None":
        return None
    if value in ("True", "true"):
        return True
    if value in ("False", "false"):
        return False
    for number in (int, float):
        try:
            return number(value)
        except ValueError:
            pass
    if value.startswith(("{", "[")):
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def parse_extra_options(args: list[str]) -> dict[str, Any]:
    """`--key value` (or `--key=value`) pairs -> {key: coerced value}; `-` in keys becomes `_`."""
    options: dict[str, Any] = {}
    rest = list(args)
    while rest:
        flag = rest.pop(0)
        if not flag.startswith("--") or len(flag) == 2:
            raise ValueError(f"extra launch options must be `--key value` pairs; got {flag!r}")
        key, has_value, value = flag[2:].partition("=")
        if not has_value:
            if not rest:
                raise ValueError(f"launch option --{key} needs a value")
            value = rest.pop(0)
        options[key.replace("-", "_")] = coerce_option(value)
    return options


# --- serve -----------------------------------------------------------------------------------------------------
def startup_launches(demo: bool, names: list[str]) -> tuple[dict[str, Any], ...]:
    """Launch bodies (as POST /v1/models) for `--demo` (every catalogue model, tiny, and the default OCR model,
    whose real weights ship with rapidocr) and `--launch NAME ...`."""
    tiny = [{"model_name": name, "tiny": True} for name in CATALOGUE] if demo else []
    ocr = [{"model_name": DEFAULT_OCR_MODEL}] if demo else []
    return (*tiny, *ocr, *({"model_name": name} for name in dict.fromkeys(names)))


def serve_overrides(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings the command line gives, checked as the config file's are (server/config.py). API keys from
    --api-key, --api-key-file and $KILN_API_KEYS (comma-separated) together replace the file's."""
    from kiln.server.config import parse_option, read_key_file

    given = {"host": args.host, "port": args.port, "log_level": args.log_level, "threads": args.threads,
             "forwarded_allow_ips": args.forwarded_allow_ips, "public_url": args.public_url,
             "drain_timeout_seconds": args.drain_timeout}
    values = {key: parse_option(key, value) for key, value in given.items() if value is not None}
    if args.allowed_hosts:
        values["allowed_hosts"] = parse_option("allowed_hosts", _comma_list(args.allowed_hosts))
    keys = [*args.api_key, *_comma_list([environ.get("KILN_API_KEYS", "")])]
    from_files = frozenset().union(*(read_key_file(Path(path)) for path in args.api_key_file))
    if keys or from_files:
        values["api_keys"] = (parse_option("api_keys", keys) if keys else frozenset()) | from_files
    if args.demo or args.launch:
        values["launch"] = startup_launches(args.demo, args.launch)
    return values


def _comma_list(items: list[str]) -> list[str]:
    """Repeated and comma-separated values as one list: ["a,b", "c"] -> ["a", "b", "c"]."""
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP server in this process until a SIGTERM/SIGINT has drained it (or, with --ray, as Ray Serve's
    ingress, each model's replicas a Serve deployment). Startup launches load in the background, so it answers at
    once."""
    from kiln.server.app import create_app, serve
    from kiln.server.config import ConfigError, check_launches, read_file, resolve

    try:
        config = resolve(read_file(args.config) if args.config else {}, serve_overrides(args, os.environ))
        check_launches(config.settings.launch)
    except ConfigError as error:
        print(f"kiln serve: error: {error}", file=sys.stderr)
        return 2
    if args.ray:  # Ray Serve's ingress, each model's replicas a Serve deployment
        from kiln.cluster.front import ClusterSettings
        from kiln.cluster.serve import serve_on_ray

        return serve_on_ray(args.ray, config.host, config.port, config.settings,
                            ClusterSettings(args.replica_cpus, config.threads))
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    serve(create_app(settings=config.settings), config.host, config.port, log_level=config.log_level,
          forwarded_allow_ips=config.forwarded_allow_ips)
    return 0


# --- model management ------------------------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> Client:
    return Client(args.endpoint, api_key=args.api_key)


def peft_model_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """Xinference's `--lora-modules NAME PATH` (repeatable), `--image-lora-load-kwargs K V` and
    `--image-lora-fuse-kwargs K V` as the launch field its CLI builds from them (values coerced as options)."""
    if not (args.lora_modules or args.lora_load_kwargs or args.lora_fuse_kwargs):
        return None
    return {
        "lora_list": [{"lora_name": name, "local_path": path} for name, path in args.lora_modules],
        "image_lora_load_kwargs": {key: coerce_option(value) for key, value in args.lora_load_kwargs} or None,
        "image_lora_fuse_kwargs": {key: coerce_option(value) for key, value in args.lora_fuse_kwargs} or None,
    }


def cmd_launch(args: argparse.Namespace) -> int:
    """Launch and wait for the load (wait_ready=true, in a thread), drawing the launch progress as Xinference's
    CLI does. A failed load answers with the server's own status (400 for the user's mistake, such as weights not
    in the cache) and message, and its uid is freed. Ctrl-C cancels the launch (Xinference's CLI asks first; here
    the interrupt is the answer)."""
    uid = args.model_uid or args.model_name
    peft = peft_model_config(args)
    options = {**args.options, **({"peft_model_config": peft} if peft else {})}
    outcome: dict[str, Any] = {}

    def launch(client: Client) -> None:
        try:
            outcome["uid"] = client.launch_model(args.model_name, args.model_type, model_uid=args.model_uid,
                                                 model_path=args.model_path, wait_ready=True, **options)
        except Exception as error:  # noqa: BLE001 - re-raised on the main thread
            outcome["error"] = error

    print(f"Launching {uid}", file=sys.stderr, flush=True)
    with _client(args) as client, _client(args) as progress:
        waiter = threading.Thread(target=launch, args=(client,), daemon=True)
        waiter.start()
        try:
            with ProgressBar(lambda: progress.get_launch_model_progress(uid)["progress"], sys.stderr):
                while waiter.is_alive():
                    waiter.join(LAUNCH_POLL_SECONDS)
                if "error" in outcome:
                    raise outcome["error"]
        except KeyboardInterrupt:
            with contextlib.suppress(KilnError):
                progress.cancel_launch_model(uid)
            print(f"Launch of {uid} cancelled", file=sys.stderr)
            return 130
    uid = outcome["uid"]
    print(f"Model uid: {uid}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Register a custom model from a spec file (Xinference's format); the server checks it."""
    spec = args.file.read_text(encoding="utf-8")
    with _client(args) as client:
        client.register_model(args.model_type, spec, persist=args.persist)
    name = json.loads(spec).get("model_name") if spec.strip().startswith("{") else None
    print(f"Registered {name}" + (" (persisted)" if args.persist else ""))
    return 0


def cmd_unregister(args: argparse.Namespace) -> int:
    name = args.name or args.model_name
    if not name:
        raise KilnError("unregister model", 400, "give the model name: kiln unregister NAME")
    with _client(args) as client:
        client.unregister_model(args.model_type, name)
    print(f"Unregistered {name}")
    return 0


def format_table(rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models()
    rows = [["UID", "NAME", "ABILITIES", "STATUS"]]
    for uid, desc in models.items():
        rows.append([uid, str(desc.get("model_name")), ",".join(desc.get("model_ability", [])), desc.get("status", "")])
    print(format_table(rows))
    return 0


def cmd_terminate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.terminate_model(args.model_uid)
    print(f"Terminated {args.model_uid}")
    return 0


# --- generate --------------------------------------------------------------------------------------------------
class ProgressBar:
    """Draws a request's progress on a stream while it runs, polling from a thread (the request call blocks)."""

    def __init__(self, read_progress: Callable[[], float], out: TextIO = sys.stderr, width: int = 30):
        self._read = read_progress
        self._out = out
        self._width = width
        self._done = threading.Event()
        self._drawn = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressBar:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        self._done.set()
        self._thread.join()
        if exc_type is None:
            self._draw(1.0)
        if self._drawn:
            print(file=self._out)

    def _run(self) -> None:
        while not self._done.wait(PROGRESS_POLL_SECONDS):
            try:
                self._draw(self._read())
            except (KilnError, httpx.HTTPError):  # not registered yet, or already gone: keep polling
                pass

    def _draw(self, progress: float) -> None:
        filled = round(progress * self._width)
        bar = "#" * filled + "." * (self._width - filled)
        print(f"\r[{bar}] {progress:4.0%}", end="", file=self._out, flush=True)
        self._drawn = True


def output_path(base: Path, index: int) -> Path:
    """out.png, out-1.png, out-2.png, ... for the images of one request."""
    return base if index == 0 else base.with_name(f"{base.stem}-{index}{base.suffix}")


def generation_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The parameters the user set, named as the server expects; unset ones are left to the model's defaults."""
    params = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "negative_prompt": args.negative_prompt,
        "sampler_name": args.sampler,
        "output_format": _SUFFIX_FORMATS.get(args.output.suffix.lower()),
    }
    return {key: value for key, value in params.items() if value is not None}


def cmd_generate(args: argparse.Namespace) -> int:
    """One text-to-image request with a progress bar; writes the images and prints each path and seed."""
    request_id = uuid.uuid4().hex
    with _client(args) as client, _client(args) as progress_client:
        handle = ImageModelHandle(client, args.model)
        with ProgressBar(lambda: progress_client.get_progress(request_id)["progress"]):
            result = handle.text_to_image(
                args.prompt, n=args.n, size=args.size, response_format="b64_json", request_id=request_id,
                **generation_parameters(args),
            )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        for index, item in enumerate(result["data"]):
            path = output_path(args.output, index)
            path.write_bytes(client.image_bytes(item))
            print(f"{path} seed={item.get('seed')}")
    return 0


# --- tiny checkpoints ------------------------------------------------------------------------------------------
def cmd_tiny_build(args: argparse.Namespace) -> int:
    from kiln.engine.tiny import build_all

    for path in build_all(args.directory, args.model or None, loras=not args.no_loras):
        print(path)
    return 0


# --- parser ----------------------------------------------------------------------------------------------------
def _add_endpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-e", "--endpoint", default=os.environ.get("KILN_ENDPOINT", DEFAULT_ENDPOINT),
        help="server URL (default: $KILN_ENDPOINT or %(default)s)",
    )
    parser.add_argument("-ak", "--api-key", "--api_key", dest="api_key", default=os.environ.get("KILN_API_KEY"),
                        help="API key sent as a bearer token (default: $KILN_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Kiln image-generation server and client.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP server",
                                epilog="Flags win over the --config file; the file wins over the defaults.")
    serve.add_argument("--config", type=Path, metavar="FILE",
                       help="a TOML file with any setting: limits, TTLs, keys, hosts, launches (README.md)")
    serve.add_argument("--host", help="interface to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="(default: 9997)")
    startup = serve.add_mutually_exclusive_group()
    startup.add_argument("--demo", action="store_true",
                         help=f"launch the tiny checkpoint of every catalogue model, and {DEFAULT_OCR_MODEL}")
    startup.add_argument("--launch", nargs="+", default=[], choices=[*CATALOGUE, *OCR_CATALOGUE], metavar="NAME",
                       help="launch catalogue models at start, with default options")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"],
                       help="(default: info)")
    serve.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    serve.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="require `Authorization: Bearer KEY` (repeatable; also $KILN_API_KEYS, comma-separated)")
    serve.add_argument("--api-key-file", action="append", default=[], metavar="PATH",
                       help="API keys, one per line (keeps them out of the process list; repeatable)")
    serve.add_argument("--allowed-hosts", action="append", metavar="HOSTS",
                       help="Host headers to answer, comma-separated or repeated; '*' for any; replaces the "
                       "default: the --host, localhost, 127.0.0.1 and the --public-url host")
    serve.add_argument("--public-url", metavar="URL",
                       help="the base of every image `url` (e.g. https://images.example.com behind a proxy)")
    serve.add_argument("--forwarded-allow-ips", metavar="IPS",
                       help="proxies whose X-Forwarded-For/-Proto are trusted, comma-separated, '*' for any "
                       "(uvicorn's option; default: $FORWARDED_ALLOW_IPS or loopback)")
    serve.add_argument("--drain-timeout", type=float, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, how long admitted requests may still run before they are ended "
                       "with a 503 (default: 300; a second signal ends the drain at once)")
    serve.add_argument("--ray", metavar="local|ADDRESS",
                       help="serve on Ray Serve: 'local' starts Ray here, else join the cluster at ADDRESS; models "
                       "then take `replica`, `n_gpu`, `gpu_idx`, `worker_ip`, `request_limits` (needs kiln[ray])")
    serve.add_argument("--replica-cpus", type=float, default=1.0,
                       help="with --ray: CPUs Ray reserves per model replica (fractions allowed; default: 1)")
    serve.set_defaults(handler=cmd_serve)

    launch = commands.add_parser(
        "launch", help="launch a model on a running server", allow_abbrev=False,
        epilog="Any other `--key value` pair is a launch option, coerced as Xinference does "
        "(None, True/False, numbers, JSON): e.g. --cpu_offload True --text_encoder_3 None",
    )
    launch.add_argument("-n", "--model-name", "--model_name", dest="model_name", required=True)
    launch.add_argument("-t", "--model-type", "--model_type", dest="model_type", default="image")
    launch.add_argument("-u", "--model-uid", "--model_uid", dest="model_uid")
    launch.add_argument("-mp", "--model-path", "--model_path", dest="model_path")
    for short, long, dest, metavar in (("-lm", "--lora-modules", "lora_modules", ("NAME", "PATH")),
                                       ("-ld", "--image-lora-load-kwargs", "lora_load_kwargs", ("KEY", "VALUE")),
                                       ("-fd", "--image-lora-fuse-kwargs", "lora_fuse_kwargs", ("KEY", "VALUE"))):
        launch.add_argument(short, long, long.replace("-", "_").replace("__", "--"), dest=dest, nargs=2,
                            action="append", default=[], metavar=metavar, help="(repeatable; as Xinference's CLI)")
    _add_endpoint(launch)
    launch.set_defaults(handler=cmd_launch)

    listing = commands.add_parser("list", help="list running models")
    _add_endpoint(listing)
    listing.set_defaults(handler=cmd_list)

    terminate = commands.add_parser("terminate", help="stop a running model")
    terminate.add_argument("-u", "--model-uid", "--model_uid", dest="model_uid", required=True)
    _add_endpoint(terminate)
    terminate.set_defaults(handler=cmd_terminate)

    register = commands.add_parser("register", help="register a custom model (a local diffusers folder) by name")
    register.add_argument("-f", "--file", type=Path, required=True, help="the model spec, JSON as Xinference's")
    register.add_argument("-t", "--model-type", "--model_type", dest="model_type", default="image")
    register.add_argument("-p", "--persist", action="store_true", help="keep it across restarts (under $KILN_HOME)")
    _add_endpoint(register)
    register.set_defaults(handler=cmd_register)

    unregister = commands.add_parser("unregister", help="remove a registered model")
    unregister.add_argument("name", nargs="?", metavar="NAME")
    unregister.add_argument("-n", "--model-name", "--model_name", dest="model_name",
                            help="as Xinference's CLI takes it")
    unregister.add_argument("-t", "--model-type", "--model_type", dest="model_type", default="image")
    _add_endpoint(unregister)
    unregister.set_defaults(handler=cmd_unregister)

    generate = commands.add_parser("generate", help="generate images with a running model and save them")
    generate.add_argument("-m", "--model", required=True, help="model uid")
    generate.add_argument("-p", "--prompt", required=True)
    generate.add_argument("--size", help="WxH (default: the model's default size)")
    generate.add_argument("--steps", type=int, help="num_inference_steps (default: the model's)")
    generate.add_argument("--guidance", type=float, help="guidance_scale (default: the model's)")
    generate.add_argument("--seed", type=int, help="omitted or -1: random; the seed used is printed")
    generate.add_argument("--negative-prompt")
    generate.add_argument("--sampler", help="sampler_name, e.g. 'Euler a' or 'DPM++ 2M Karras'")
    generate.add_argument("--n", type=int, default=1, help="number of images")
    generate.add_argument("-o", "--output", type=Path, default=Path("out.png"),
                          help="file for the first image; more go to NAME-1.EXT, ... (default: %(default)s)")
    _add_endpoint(generate)
    generate.set_defaults(handler=cmd_generate)

    tiny = commands.add_parser("tiny", help="tiny random-weight checkpoints")
    tiny_commands = tiny.add_subparsers(dest="tiny_command", required=True, metavar="COMMAND")
    build = tiny_commands.add_parser("build", help="build tiny checkpoints into DIR/<name> and their LoRAs into "
                                     "DIR/loras/<name>")
    build.add_argument("directory", type=Path, metavar="DIR")
    build.add_argument("--model", nargs="+", choices=list(CATALOGUE), metavar="NAME",
                       help="catalogue names (default: all)")
    build.add_argument("--no-loras", action="store_true", help="skip the tiny LoRAs (DIR/loras/<name>/)")
    build.set_defaults(handler=cmd_tiny_build)

    _add_contributed_commands(commands)
    return parser


def _add_contributed_commands(commands: argparse._SubParsersAction) -> None:
    """Commands other Kiln packages add through the `kiln.commands` entry points (`bench` from the benchmarks,
    `build-engines` from the engine's backends): each entry is `add_command(commands)`. The CLI so never imports
    the benchmarks, which themselves drive the server."""
    for entry in sorted(entry_points(group="kiln.commands"), key=lambda entry: entry.name):
        entry.load()(commands)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.handler is cmd_launch:
        try:
            args.options = parse_extra_options(extra)
        except ValueError as error:
            parser.error(str(error))
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args)
    except KilnError as error:
        print(f"kiln: error: {error}", file=sys.stderr)
    except httpx.TransportError as error:
        print(f"kiln: error: cannot reach {args.endpoint}: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
