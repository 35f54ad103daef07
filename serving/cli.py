"""``voltage-serve``: predict from the command line, and package champions for ``bentoml build``.

    voltage-serve predict cathode.cif --ion Mg                 # local: champion, else release
    voltage-serve predict POSCAR --ion Li --url http://127.0.0.1:3000 --json
    voltage-serve predict CoO2.cif --ion Li --discharged LiCoO2.cif   # + CHGNet physics voltage
    voltage-serve export-models                                # champions -> BentoML store
    voltage-serve screen candidates.tar.gz --ions Li,Mg --out results/screen.csv \
        --summary results/screen.json                          # rank many candidates
    voltage-serve screen-merge results/shard-*.csv --out results/all.csv --summary results/all.json

Exit status: 0 answered; 2 bad input (unreadable file, unknown format or ion, a structure the
service refuses; the message names the problem); 3 no answer (no champion, service unreachable
or failing). Local mode goes through the same predictor as the service, so answers are equal.
``screen`` and ``screen-merge`` (``serving/screen/``, docs/interpretability.md, screening) exit 2
for what the user can fix (options, ions, inputs, partial files of another screen).

Local mode answers in seconds from a cold start: the structure is parsed and checked (and the ion
named) before torch, MLflow or a model is imported, so bad input fails at once; the model is the
registry's champion when the registry has one, else the pretrained release (``release/``,
``voltage release``), and a local sqlite registry is asked with sqlite3 itself, so MLflow is
imported only when a champion is actually downloaded. Heavy modules are imported inside the
commands: ``--help`` imports none of them, nor does a refused file import torch, CHGNet or the
HTTP client; CHGNet is imported only for a model that serves a CHGNet head (every ion of the
current release does). Once the answer is printed, the command's process ends at once
(``os._exit``) instead of tearing down the interpreter, which would take another 0.5-1.7 s.
Where a cold start goes: ``bench/cli_cold_start.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from serving.formats import guess_format

app = typer.Typer(help="Electrode voltage service tools.", no_args_is_help=True)

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
SOURCES = ("auto", "registry", "release")


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    # Idle OpenMP threads sleep instead of spinning, unless the user chose: two spinning torch
    # processes on a shared CPU slow each other 10-25x. Set here, before a command imports torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import logging

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The structure texts of one request: charged (required) and discharged (optional)."""

    text: str
    fmt: str
    discharged: str | None = None
    discharged_fmt: str | None = None

    def fields(self) -> dict[str, Any]:
        """The request's structure fields, as the HTTP API and ``PredictRequest`` name them."""
        out: dict[str, Any] = {"structure": self.text, "format": self.fmt}
        if self.discharged is not None:
            out.update(discharged_structure=self.discharged, discharged_format=self.discharged_fmt)
        return out


def _read_input(path: Path, fmt: str | None, what: str) -> tuple[str, str]:
    """(text, format) of one structure file; exit 2 naming the file when it is unusable."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read {what} {path}: {exc}", EXIT_BAD_INPUT) from None
    fmt = (fmt or guess_format(path) or "").lower()
    if fmt not in ("cif", "poscar", "json"):
        option = "--format" if what == "structure" else "--discharged-format"
        raise _fail(
            f"cannot tell the format of {path.name}; pass {option} cif|poscar|json",
            EXIT_BAD_INPUT,
        )
    return text, fmt


def check_inputs(inputs: Inputs) -> None:
    """Parse and check the structure(s) exactly as the service will, before anything imports
    torch or loads a model: bad input exits 2 in well under a second, naming the problem."""
    from serving.config import max_sites
    from serving.errors import ServingError
    from serving.inputs import to_structure

    try:
        limit = max_sites()
    except ValueError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None
    parts = [("", inputs.text, inputs.fmt)]
    if inputs.discharged is not None:
        parts.append(("discharged structure: ", inputs.discharged, inputs.discharged_fmt))
    for what, text, fmt in parts:
        try:
            to_structure(text, fmt, limit)
        except ServingError as e:
            raise _fail(f"{e.kind}: {what}{e.message}", EXIT_BAD_INPUT) from None


def choose_source(source: str, tracking_uri: str, name: str) -> str:
    """The predictor's model source for one ion: ``auto`` asks a local sqlite registry for a
    champion without MLflow (none: the release, and MLflow is never imported); any other store
    is left to the service's own ``auto`` (registry, else release)."""
    if source != "auto":
        return source
    from voltage_model.registry import champion_in_store

    return "release" if champion_in_store(tracking_uri, name) is False else "auto"


def _predict_local(
    ion: str, inputs: Inputs, tracking_uri: str | None, source: str = "auto"
) -> dict[str, Any]:
    from serving.config import ServingConfig, quiet_mlflow_defaults

    try:
        config = ServingConfig.from_env()
    except ValueError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None
    known = {i.lower(): i for i in config.ions}
    if ion.lower() not in known:
        raise _fail(f"unknown ion {ion!r}; use one of {', '.join(config.ions)}", EXIT_BAD_INPUT)
    name = known[ion.lower()]
    uri = tracking_uri or config.tracking_uri
    config = dataclasses.replace(
        config,
        ions=(name,),
        disabled_ions=frozenset(),
        model_source=choose_source(source, uri, config.model_name(name)),
        tracking_uri=uri,
        drift_reference=None,
    )
    import torch

    from serving.errors import ServingError
    from serving.predictor import PredictRequest
    from serving.runtime import ServingRuntime
    from voltage_model.numerics import flush_subnormals

    flush_subnormals()  # before the first torch op creates worker threads
    torch.set_num_threads(1)
    quiet_mlflow_defaults()
    # Libraries print while loading (CHGNet announces itself on stdout): keep stdout for the
    # answer alone, so that --json output parses.
    with contextlib.redirect_stdout(sys.stderr):
        runtime = ServingRuntime(config, warm=False).start(watch=False)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = runtime.predictor.predict_sync(
                PredictRequest.from_mapping({"ion": name, **inputs.fields()})
            )
    except ServingError as e:
        code = EXIT_BAD_INPUT if e.http_status == 400 else EXIT_UNAVAILABLE
        hint = ""
        if e.kind == "no_champion" and config.model_source != "registry":
            hint = (f" and the release at {config.release_dir} has no loadable {name} model "
                    "(run with -v for why; `voltage release` writes one)")  # fmt: skip
        raise _fail(f"{e.kind}: {e.message}{hint}", code) from None
    finally:
        runtime.stop()
    return result.to_dict()


def _predict_remote(url: str, ion: str, inputs: Inputs, timeout: float) -> dict[str, Any]:
    import urllib.error  # here, not at the top: http.client, ssl and email cost every command
    import urllib.request

    body = json.dumps({"ion": ion, **inputs.fields()}).encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/predict",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read())
            message = f"{detail.get('kind', 'error')}: {detail.get('error', detail)}"
        except ValueError:
            message = f"HTTP {exc.code}"
        # 429 (too many requests) is the service's load, not the input's fault.
        code = EXIT_BAD_INPUT if 400 <= exc.code < 500 and exc.code != 429 else EXIT_UNAVAILABLE
        raise _fail(message, code) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise _fail(f"service at {url} not reachable: {exc}", EXIT_UNAVAILABLE) from None


def format_table(result: dict[str, Any]) -> str:
    model = result["model"]
    rows = [
        ("ion", result["ion"]),
        ("formula", result["formula"]),
        ("sites", str(result["n_sites"])),
        ("voltage", f"{result['voltage']:.3f} V"),
        ("uncertainty", f"{result['uncertainty']:.3f} V"),
        ("model", f"{model['name']} v{model['version']} ({model['source']})"),
    ]
    if result.get("reference_voltage") is not None:
        rows.append(("snapshot voltage", f"{result['reference_voltage']:.3f} V"))
    if result.get("physics_voltage") is not None:
        rows.append(("physics voltage", f"{result['physics_voltage']:.3f} V (CHGNet)"))
    rows += [("warning", w) for w in result.get("warnings", [])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


@app.command()
def predict(
    structure: Annotated[Path, typer.Argument(help="CIF, POSCAR or pymatgen JSON file")],
    ion: Annotated[str, typer.Option("--ion", help="working ion, e.g. Li, Mg")],
    fmt: Annotated[
        str | None, typer.Option("--format", help="cif | poscar | json (default: from the name)")
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="a running service, e.g. http://127.0.0.1:3000")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON answer")] = False,
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help="MLflow store (local mode)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for --url")] = 60.0,
    discharged: Annotated[
        Path | None,
        typer.Option(help="discharged end of the same host: also the CHGNet physics voltage"),
    ] = None,
    discharged_fmt: Annotated[
        str | None, typer.Option("--discharged-format", help="default: from the name")
    ] = None,
    source: Annotated[
        str,
        typer.Option(
            help="local mode: auto (the registry champion, else the release), registry, release"
        ),
    ] = "auto",
) -> None:
    """Predict the average voltage of one structure with the ion's champion model (or, without
    one, the pretrained release); the answer names the model and its source."""
    if source not in SOURCES:
        raise _fail(f"--source must be one of {', '.join(SOURCES)}", EXIT_BAD_INPUT)
    text, fmt = _read_input(structure, fmt, "structure")
    inputs = Inputs(text, fmt)
    if discharged is not None:
        inputs = Inputs(text, fmt, *_read_input(discharged, discharged_fmt, "discharged structure"))
    if url:
        result = _predict_remote(url, ion, inputs, timeout)
        typer.echo(json.dumps(result, indent=2) if as_json else format_table(result))
        return
    try:
        check_inputs(inputs)
        result = _predict_local(ion, inputs, tracking_uri, source)
        typer.echo(json.dumps(result, indent=2) if as_json else format_table(result))
    except typer.Exit as exc:
        _exit_now(exc.exit_code)
        raise
    _exit_now(0)


def _own_process() -> bool:
    """Whether this process is the command itself (the ``voltage-serve`` script, ``python -m
    serving.cli``), with its own stdout: not a test runner or a program that called ``app()``."""
    main = sys.modules.get("__main__")
    launched = (
        Path(sys.argv[0]).name == "voltage-serve"
        or getattr(getattr(main, "__spec__", None), "name", None) == "serving.cli"
    )
    return launched and sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__


def _exit_now(code: int) -> None:
    """End a local prediction at once (answer or error printed, runtime stopped): the
    interpreter's own teardown, unloading the ~2,500 modules and their objects that torch,
    CHGNet and pymatgen brought, takes 0.5-1.7 s (0.2 s after a refused file) and changes
    nothing for a one-shot command (``bench/cli_cold_start.py``). Only in the command's own
    process; else it returns."""
    if not _own_process():
        return
    import logging

    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return  # e.g. a closed pipe: the interpreter reports it as it always did
    os._exit(code)


@app.command("export-models")
def export_models_cmd(
    ion: Annotated[
        list[str] | None, typer.Option("--ion", help="ions to export (default: all configured)")
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri")] = None,
) -> None:
    """Save each ion's registry champion into the BentoML model store (then: bentoml build)."""
    from serving.config import ServingConfig, quiet_mlflow_defaults
    from serving.export_models import export_models

    quiet_mlflow_defaults()
    config = ServingConfig.from_env()
    ions = ion or list(config.enabled_ions)
    uri = tracking_uri or config.tracking_uri
    try:
        exported = export_models(ions, uri, config.name_prefix)
    except Exception as exc:
        raise _fail(f"export failed: {exc}", EXIT_UNAVAILABLE) from None
    for e in exported:
        state = "exported" if e.created else "already exported"
        typer.echo(f"{e.ion}: {e.registry_name} v{e.registry_version} -> {e.tag} ({state})")
    missing = sorted(set(ions) - {e.ion for e in exported})
    if missing:
        typer.echo(f"no champion (not exported): {', '.join(missing)}", err=True)
    if not exported:
        raise typer.Exit(EXIT_UNAVAILABLE)


# =============================================================================== screening
def _screen_ions(
    params: Path, ions: str, checkpoint: list[str] | None
) -> tuple[list[str], dict[str, Path], dict[str, Any]]:
    """The ions to screen (default: every ion of ``params.yaml``), their ``ION=PATH`` checkpoints
    and ``params.yaml``'s ``mlflow`` section; exit 2 naming what is wrong."""
    from voltage_model.naming import read_params

    try:
        settings = read_params(params)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None
    enabled = settings["ions"]
    names = [i.strip() for i in ions.split(",") if i.strip()] or enabled
    for ion in names:
        if ion not in enabled:
            raise _fail(f"ion {ion!r} is not enabled in params.yaml (ions: {enabled})",
                        EXIT_BAD_INPUT)  # fmt: skip
    paths = {}
    for spec in checkpoint or []:
        ion, sep, path = spec.partition("=")
        if not sep or ion not in names:
            raise _fail(f"--checkpoint wants ION=PATH for one of {names}, got {spec!r}",
                        EXIT_BAD_INPUT)  # fmt: skip
        paths[ion] = Path(path)
    return names, paths, settings["mlflow"]


def _use_registry(mlflow_settings: dict[str, Any]) -> str:
    """Point MLflow at the pipeline's registry (``MLFLOW_TRACKING_URI``, else ``params.yaml``'s
    ``mlflow.tracking_uri``, else the local default store) and return the model name prefix."""
    import mlflow

    from serving.config import resolve_tracking_uri
    from voltage_model.registry import sqlite_path

    uri = resolve_tracking_uri(os.environ, mlflow_settings)
    db = sqlite_path(str(uri))
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(str(uri))
    return str(mlflow_settings.get("model_name_prefix") or "electrode-voltage")


@app.command()
def screen(
    inputs: Annotated[Path, typer.Argument(help="folder, .tar(.gz) or .zip of CIF/POSCAR/JSON")],
    out: Annotated[Path, typer.Option(help="ranked CSV (.errors.csv, .partial.jsonl beside it)")],
    summary: Annotated[Path, typer.Option(help="summary JSON out")],
    ions: Annotated[str, typer.Option(help="comma-separated ions (default: params.yaml)")] = "",
    checkpoint: Annotated[
        list[str] | None, typer.Option(help="ION=PATH instead of the champion (repeatable)")
    ] = None,
    threshold: Annotated[float, typer.Option(help="voltage threshold of the summary (V)")] = 3.0,
    batch_size: Annotated[int, typer.Option(help="structures per inference batch")] = 64,
    shard: Annotated[str | None, typer.Option(help="i/n: only shard i (0-based) of n")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume")] = True,
    workers: Annotated[int, typer.Option(
        help="processes (parse, graphs, inference) with --engine local")] = 2,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    rescore_top: Annotated[int, typer.Option(
        help="tier 2: per CHGNet-serving ion, re-score the K highest tier-1 voltages with the "
             "champion as served (0: none)")] = 1000,
    rescore_uncertain: Annotated[int, typer.Option(
        help="tier 2: ... and the K most uncertain tier-1 figures (0: none)")] = 500,
    engine: Annotated[str, typer.Option(
        help="local: this machine, --workers processes; ray: a Ray cluster (same outputs)")
    ] = "local",
    ray_address: Annotated[str | None, typer.Option(
        help="ray: 'auto' (the cluster this machine joined with ray start) or HOST:PORT of its "
             "head; unset: a private Ray on this machine")] = None,
    ray_actors: Annotated[int | None, typer.Option(
        help="ray: actors, one core each (default: one per CPU of the cluster)")] = None,
    params: Annotated[Path, typer.Option(
        "--params", help="params.yaml to read (ions, mlflow)")] = Path("params.yaml"),
) -> None:  # fmt: skip
    """Rank candidate structures by predicted voltage per ion (resumable, shardable); champions
    serving a CHGNet head re-score their top and most uncertain candidates (tier 2).
    ``--engine ray`` runs the batches on a Ray cluster (docs/interpretability.md, screening)."""
    from voltage_model.numerics import flush_subnormals

    flush_subnormals()  # before torch creates its threads (the pool's processes inherit it)
    from serving.screen.inputs import parse_shard
    from serving.screen.models import champion_models, checkpoint_models
    from serving.screen.outputs import report_lines
    from serving.screen.run import Rescore, run_screen
    from voltage_model.registry import ModelLoadError

    try:
        rescore = Rescore(rescore_top, rescore_uncertain)
    except ValueError as exc:  # checked before any model is loaded
        raise _fail(str(exc).replace("rescore_", "--rescore-"), EXIT_BAD_INPUT) from None
    if engine not in ("local", "ray"):
        raise _fail(f"--engine must be local or ray, got {engine!r}", EXIT_BAD_INPUT)
    if engine == "ray":
        from serving.screen.ray_engine import RayMissingError, require_ray

        try:
            require_ray()
        except RayMissingError as exc:
            raise _fail(str(exc), EXIT_BAD_INPUT) from None

    names, paths, mlflow_settings = _screen_ions(params, ions, checkpoint)
    rest = [i for i in names if i not in paths]
    prefix = _use_registry(mlflow_settings) if rest else ""
    try:
        kw = {"threshold": threshold, "batch_size": batch_size, "shard": parse_shard(shard),
              "resume": resume, "progress": progress, "rescore": rescore}  # fmt: skip
        if engine == "ray":
            from serving.screen.ray_engine import RaySettings, checkpoint_blobs, run_screen_ray

            settings = RaySettings(address=ray_address, actors=ray_actors)
            blobs = checkpoint_blobs(paths, rest, prefix)
            res = run_screen_ray(inputs, names, blobs, out, summary, settings, **kw)
        else:
            models = checkpoint_models(paths)
            models.update(champion_models(rest, prefix) if rest else {})
            res = run_screen(inputs, names, models, out, summary, workers=workers, **kw)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None
    except ModelLoadError as exc:  # no champion, or it cannot load: no answer, as for predict
        raise _fail(str(exc), EXIT_UNAVAILABLE) from None
    typer.echo(f"{res['n_predicted']} predicted, {res['n_errors']} unusable (see errors CSV)")
    for line in report_lines(res, threshold):
        typer.echo(line)


@app.command("screen-merge")
def screen_merge(
    parts: Annotated[list[Path], typer.Argument(help="shard CSVs (or their .partial.jsonl)")],
    out: Annotated[Path, typer.Option(help="merged ranked CSV out")],
    summary: Annotated[Path, typer.Option(help="merged summary JSON out")],
    threshold: Annotated[float, typer.Option(help="voltage threshold of the summary (V)")] = 3.0,
    allow_incomplete: Annotated[bool, typer.Option(help="merge unfinished shards too")] = False,
) -> None:
    """Merge the outputs of ``voltage-serve screen --shard i/n`` for i = 0..n-1."""
    from serving.screen.merge import merge_screen
    from serving.screen.outputs import report_lines

    try:
        res = merge_screen(parts, out, summary, threshold, not allow_incomplete)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None
    for line in report_lines(res, threshold):
        typer.echo(line)


if __name__ == "__main__":
    app()
