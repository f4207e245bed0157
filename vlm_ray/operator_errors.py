"""Failures the operator fixes outside the code, said in one sentence instead of a traceback.

A stage that cannot reach its object store, has no credentials for it, finds a run folder
holding work made with other settings, misses what an earlier stage writes, asks the cluster
for what it cannot give, or runs a GPU out of memory stops with a message naming the fix; the
command line prints that message (the traceback only with -v). Anything else is a bug or an
unforeseen failure and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlparse

from vlm_ray import layout

_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}


class OperatorError(Exception):
    """A failure whose message is the whole story: what is wrong and what to change."""


class RunConflictError(OperatorError):
    """A run folder holds work made with other settings: refused rather than mixed."""


def elsewhere(prefix: str) -> str:
    """Where work refused at prefix can go instead, for a RunConflictError's message: a bulk
    job's folder can give way to another infer.job; anything else to a new run."""
    return "another infer.job or run.uri" if prefix.startswith(layout.BULK) else "a new run.uri"


class MissingInputError(OperatorError, FileNotFoundError):
    """What this stage reads is not there yet: an earlier stage has not run (the message says which)."""


class ClusterMismatchError(OperatorError):
    """The spec asks for what this cluster cannot give: a GPU engine or float8 without GPUs, an
    actor no node can host (Ray would wait for it forever)."""


def _causes(err: BaseException) -> Iterator[BaseException]:
    """err and what it wraps (the exception chain); a Ray task's or actor's error by its `cause`.

    Ray re-raises a task's exception as a class deriving from both RayTaskError and the
    original, whose text is the remote traceback: the original (`cause`) is what to read.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            todo.insert(0, cause)
            continue
        yield e
        todo += [e.__cause__, e.__context__]


def _is_gpu_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError, known by its class so that the command line need not import torch."""
    return any(
        c.__name__ == "OutOfMemoryError" and c.__module__.startswith("torch")
        for c in type(e).__mro__
    )


def operator_message(err: BaseException) -> str | None:
    """The sentence for a failure the operator can fix (an OperatorError's own message; a GPU out
    of memory; S3 credentials, endpoint, bucket or permissions); None for anything else."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    for e in _causes(err):
        if isinstance(e, OperatorError):
            return str(e)
        if _is_gpu_out_of_memory(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return (
                f"a GPU ran out of memory ({first}): lower generation.batch_size or "
                "infer.actors_per_gpu for infer, train.per_device_train_batch_size or "
                "model.max_seq_length for train"
            )
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return (
                "no credentials for S3: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                "AWS_PROFILE) where the job runs; MinIO, Ceph and other S3 servers read the same"
            )
        if isinstance(e, EndpointConnectionError):
            url = urlparse(str(e.kwargs.get("endpoint_url", "")))  # the request's whole URL
            return (
                f"cannot reach the S3 endpoint {url.scheme}://{url.netloc}: check "
                "run.s3_endpoint_url (or AWS_ENDPOINT_URL) and that the server is up"
            )
        if isinstance(e, ClientError):
            error = e.response.get("Error", {})
            code = str(error.get("Code", ""))
            operation = getattr(e, "operation_name", "a request")
            if code == "NoSuchBucket":
                return (
                    f"S3 bucket {error.get('BucketName') or '(of run.uri)'} does not exist: "
                    "create it, or fix run.uri (or the source's URI)"
                )
            if code in _DENIED:
                return (
                    f"S3 refused {operation} ({code}: {error.get('Message', '')}): check that "
                    "the credentials may read and write under run.uri"
                )
    return None
