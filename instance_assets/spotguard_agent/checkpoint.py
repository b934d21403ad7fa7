"""Checkpoints: a task's progress in S3, so the next attempt (on any instance) resumes.

One object per message at ``contracts.checkpoint_key(fleet, message_id)`` in
``Env.CHECKPOINT_BUCKET``. PutObject is atomic: a reader sees the previous object or the
new one, never a part, and a save that cannot finish (the instance is reclaimed mid-upload)
leaves the previous checkpoint intact. Over ``Env.CHECKPOINT_MAX_BYTES`` a checkpoint is
rejected whole (clear log line, ``CheckpointsRejected``), never truncated. The object is
deleted when the task succeeds; the bucket's lifecycle rule expires what a crash left.

Each object carries the attempt that wrote it (SQS receive count, metadata ``attempt``). An
attempt that was released may still be saving while the next attempt runs elsewhere; it
does not overwrite a checkpoint written by a later attempt. The first save of an attempt
looks (HeadObject) before it writes; every later save of that attempt is one conditional
PutObject (``If-Match`` the ETag of its own last write), so a task that checkpoints often
costs one request per checkpoint, not two; if anyone else wrote in between (412), the save
looks again before it writes. Finished tasks' checkpoints are deleted in one DeleteObjects
call per batch of completions.

Python handlers: ``context.checkpoint(data)`` / ``context.resumed``. Command mode: the files
in ``$SPOTGUARD_CHECKPOINT_DIR`` as one tar.gz object, saved after a released command
exited and restored before the next attempt starts.

No bucket configured: checkpoints are disabled (one log line at start-up);
``context.checkpoint`` stores nothing and returns False, ``context.resumed`` is None.

The S3 client comes from the agent's one client factory (``AwsClients``: retries, the
fault-injection hook of benchmarks and the drill), like every other AWS call of the agent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from spotguard_core.contracts import Env, Metric, checkpoint_key

from spotguard_agent import archives
from spotguard_agent.handler_host import CheckpointError, CheckpointTooLarge

LOG = logging.getLogger("spotguard.checkpoint")
ATTEMPT_METADATA = "attempt"
#: DeleteObjects takes up to this many keys per call.
DELETE_OBJECTS_LIMIT = 1000
__all__ = ["CheckpointError", "CheckpointStore", "CheckpointTooLarge"]


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


class CheckpointStore:
    def __init__(
        self,
        s3: Any,
        *,
        bucket: str,
        fleet: str,
        max_bytes: int,
        count: Callable[[Metric], None] | None = None,
    ) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.fleet = fleet
        self.max_bytes = max_bytes
        self._count = count or (lambda _metric: None)
        #: (message id, attempt) -> the ETag of the object as that attempt last wrote it.
        self._written: dict[tuple[str, int], str] = {}
        self._written_lock = threading.Lock()
        if not bucket:
            LOG.warning(
                "checkpoints disabled: %s is not set (context.checkpoint() stores nothing and "
                "returns False, context.resumed is None, command checkpoint files are not kept)",
                Env.CHECKPOINT_BUCKET.value,
            )

    @property
    def enabled(self) -> bool:
        return bool(self.bucket)

    def key(self, message_id: str) -> str:
        return checkpoint_key(self.fleet, message_id)

    # ------------------------------------------------------------------ bytes
    def load(self, message_id: str) -> bytes | None:
        """The last checkpoint, or None (none stored, disabled, or unreadable: start over)."""
        if not self.enabled:
            return None
        try:
            response = self.s3.get_object(Bucket=self.bucket, Key=self.key(message_id))
            data: bytes = response["Body"].read()
        except Exception as error:  # noqa: BLE001 - S3/botocore errors: resume is best effort
            if _error_code(error) not in ("NoSuchKey", "404", "NotFound"):
                LOG.warning("checkpoint of %s unreadable, starting over: %s", message_id, error)
            return None
        return data

    def save(self, message_id: str, data: bytes, *, attempt: int) -> bool:
        """Store ``data`` whole. False when disabled or superseded by a later attempt."""
        if not self.enabled:
            return False
        if len(data) > self.max_bytes:
            self.reject(message_id, len(data))
            raise CheckpointTooLarge(
                f"checkpoint of {len(data)} bytes is over the limit of {self.max_bytes} bytes "
                f"({Env.CHECKPOINT_MAX_BYTES.value}); nothing was stored"
            )
        key = self.key(message_id)
        with self._written_lock:
            own_etag = self._written.get((message_id, attempt))
        try:
            etag = self._put_if_still_ours(key, data, attempt, own_etag) if own_etag else None
            if etag is None:  # the attempt's first save, or someone else wrote since our last
                if self._written_by_later_attempt(key, attempt):
                    LOG.info("checkpoint of %s not saved: a later attempt already wrote one", message_id)
                    return False
                etag = self._put(key, data, attempt)
        except Exception as error:
            self._count(Metric.CHECKPOINTS_REJECTED)
            LOG.warning("checkpoint of %s not saved (the previous one is intact): %s", message_id, error)
            raise CheckpointError(f"checkpoint not saved: {error}") from error
        with self._written_lock:
            self._written[(message_id, attempt)] = etag
        self._count(Metric.CHECKPOINTS_SAVED)
        LOG.info("checkpoint of %s saved (%d bytes, attempt %d)", message_id, len(data), attempt)
        return True

    def reject(self, message_id: str, size: int) -> None:
        self._count(Metric.CHECKPOINTS_REJECTED)
        LOG.error(
            "checkpoint of %s rejected: %d bytes is over the limit of %d bytes (%s); "
            "the previous checkpoint is kept, nothing was truncated",
            message_id,
            size,
            self.max_bytes,
            Env.CHECKPOINT_MAX_BYTES.value,
        )

    def _put(self, key: str, data: bytes, attempt: int, **condition: str) -> str:
        response = self.s3.put_object(
            Bucket=self.bucket, Key=key, Body=data, Metadata={ATTEMPT_METADATA: str(attempt)}, **condition
        )
        return str(response.get("ETag", ""))

    def _put_if_still_ours(self, key: str, data: bytes, attempt: int, own_etag: str) -> str | None:
        """One conditional PutObject: the new ETag, or None when the object is no longer the
        one this attempt wrote last (412: another attempt wrote; 404: it was deleted)."""
        try:
            return self._put(key, data, attempt, IfMatch=own_etag)
        except Exception as error:
            if _error_code(error) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                return None
            raise

    def delete(self, message_id: str) -> None:
        self.delete_many([message_id])

    def delete_many(self, message_ids: Iterable[str]) -> None:
        """The checkpoints of finished messages, in one DeleteObjects call per 1,000 (best
        effort: the bucket's lifecycle rule expires what is left)."""
        ids = list(dict.fromkeys(message_ids))
        self.forget(ids)
        if not self.enabled or not ids:
            return
        for start in range(0, len(ids), DELETE_OBJECTS_LIMIT):
            chunk = ids[start : start + DELETE_OBJECTS_LIMIT]
            try:
                response = self.s3.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self.key(i)} for i in chunk], "Quiet": True},
                )
                errors = response.get("Errors", [])
            except Exception as error:  # noqa: BLE001 - the lifecycle rule expires it anyway
                LOG.warning("checkpoints of %d messages not deleted (they expire): %s", len(chunk), error)
                continue
            for failure in errors:
                LOG.warning(
                    "checkpoint %s not deleted (it expires): %s", failure.get("Key"), failure.get("Code")
                )

    def forget(self, message_ids: Iterable[str]) -> None:
        """Drop what this store remembers of these messages' own writes (their attempts ended)."""
        gone = set(message_ids)
        with self._written_lock:
            for written in [w for w in self._written if w[0] in gone]:
                del self._written[written]

    def _written_by_later_attempt(self, key: str, attempt: int) -> bool:
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=key)
        except Exception:  # noqa: BLE001 - absent (404) or unknown: write ours
            return False
        try:
            return int(head.get("Metadata", {}).get(ATTEMPT_METADATA, "0")) > attempt
        except ValueError:
            return False

    # ------------------------------------------------------------------ command mode
    def restore_directory(self, message_id: str, directory: Path) -> bool:
        """Unpack the last checkpoint into ``directory``. True when there was one."""
        data = self.load(message_id)
        if data is None:
            return False
        try:
            files = archives.extract_bytes(data, directory)
        except Exception as error:  # noqa: BLE001 - a bad archive means: start over
            LOG.warning("checkpoint of %s not restored (starting over): %s", message_id, error)
            return False
        LOG.info("checkpoint of %s restored: %d files", message_id, files)
        return True

    def save_directory(self, message_id: str, directory: Path, *, attempt: int) -> bool:
        """Save the files in ``directory`` (nothing when it is empty)."""
        if not self.enabled or not directory.is_dir() or not any(directory.iterdir()):
            return False
        raw_size = archives.directory_size(directory)
        if raw_size > self.max_bytes * 4:  # do not even pack something hopeless
            self.reject(message_id, raw_size)
            return False
        data = archives.pack_directory(directory)
        try:
            return self.save(message_id, data, attempt=attempt)
        except CheckpointError:
            return False  # logged and counted by save()
