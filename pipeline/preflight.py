"""Checks the driver makes before a run starts anything: the output folder can be written, and the Ray cluster the
run should join answers. Each failure is a ``PreflightError`` with one line that says what to do (exit code 2).

Ray itself would find these too, but late and badly: ``ray.init`` on an address where nothing listens waits minutes
before it gives up, and an output path that is a file ends in a traceback from deep inside the runner.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .config import ConfigError
from .storage import ObjectPath, exclusive_create_problem, is_remote, location

# HTTP/2's client connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, the Ray Client server)
# answers with a frame of its own, so this tells "Ray is there" from "something else listens on that port".
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x4


class PreflightError(ConfigError):
    """The run cannot start; the message says why and what to do."""


def check_output_dir(output_dir: str | Path) -> None:
    """The output folder exists as a folder or can be made, and the run may write in it (for a bucket URL: the
    bucket exists and answers with the credentials of this environment)."""
    if is_remote(output_dir):
        check_bucket(location(output_dir))  # type: ignore[arg-type]
        return
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise PreflightError(f"run.output_dir={path} is a file, not a folder; choose another (--output DIR)")
    probe = path
    while not probe.exists():  # the nearest existing folder decides whether the output can be created
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise PreflightError(f"run.output_dir={path} cannot be created: {probe} is a file")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise PreflightError(f"run.output_dir={path}: no permission to write in {probe}; choose another (--output)")


def check_bucket(out: ObjectPath) -> None:
    """The bucket exists and answers with this environment's credentials, and the lock can be taken there."""
    from pyarrow import fs as pafs

    try:
        bucket = out.fs.get_file_info(out.bucket)
        prefix = out.fs.get_file_info(out.key)
    except OSError as exc:
        raise PreflightError(
            f"run.output_dir={out}: the object store did not answer ({str(exc).splitlines()[0]}). Check the "
            "credentials in this environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a role for s3://, "
            "GOOGLE_APPLICATION_CREDENTIALS for gs://) and the URL's endpoint_override/scheme/region") from None
    problem = exclusive_create_problem(out)
    if problem:
        raise PreflightError(f"run.output_dir={out}: {problem}")
    if bucket.type == pafs.FileType.NotFound:
        raise PreflightError(f"run.output_dir={out}: bucket {out.bucket!r} does not exist; create it first")
    if prefix.type == pafs.FileType.File:
        raise PreflightError(f"run.output_dir={out} is an object, not a prefix; choose another (--output)")


def split_address(address: str) -> tuple[str, int] | None:
    """``host:port`` (optionally ``ray://`` or ``[v6]:port``) -> (host, port); None for addresses Ray resolves
    itself (``auto``, ``local``) or that carry no port."""
    text = address.strip()
    if text.startswith("ray://"):
        text = text[len("ray://"):]
    if text in {"auto", "local", ""}:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def probe_grpc(host: str, port: int, timeout_s: float) -> str | None:
    """Why nothing Ray-like answers at host:port within ``timeout_s`` (connect + first frame), or None."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(_H2_PREFACE)
            head = sock.recv(9)
    except socket.gaierror as exc:
        return f"the host name does not resolve ({exc.strerror or exc})"
    except ConnectionRefusedError:
        return "nothing listens on that port (connection refused)"
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout_s:g} s (run.ray_connect_timeout_s)"
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc})"
    if len(head) < 9 or head[3] != _H2_SETTINGS:
        return "something answers on that port, but it is not a Ray head node (no gRPC)"
    return None


def check_ray_address(address: str | None, timeout_s: float) -> None:
    """A run that joins a cluster fails fast, with a message, when the cluster is not there."""
    if not address:
        return
    target = split_address(address)
    if target is None:
        return
    reason = probe_grpc(*target, timeout_s)
    if reason:
        raise PreflightError(f"cannot reach the Ray cluster at {address}: {reason}. Start it (`ray start --head`), "
                             "fix run.ray_address / --address / RAY_ADDRESS, or leave them unset for a local run")


def check_run(config) -> None:
    """Everything the driver can check about a run before it takes the output lock and starts Ray."""
    check_output_dir(config.run.output_dir)
    check_ray_address(config.run.ray_address or os.environ.get("RAY_ADDRESS"), config.run.ray_connect_timeout_s)
