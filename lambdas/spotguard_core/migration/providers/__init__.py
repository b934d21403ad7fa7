"""Migration providers: where instances are listed and how one is migrated."""

from __future__ import annotations

from typing import Protocol

from spotguard_core.migration.models import CandidateInstance, MigrationResult


class MigrationProvider(Protocol):
    """A cloud that can list its instances (with eligibility) and migrate one of them."""

    name: str

    def list_instances(self) -> list[CandidateInstance]:
        """Every instance the provider manages for us, each with its eligibility verdict."""
        ...

    def migrate(self, instance: CandidateInstance, *, job_id: str, attempt: int) -> MigrationResult:
        """Migrate/replace one eligible instance. Raises ``MigrationError`` on failure.

        Must be safe to call again for the same ``job_id`` (retries) without creating
        a second replacement.
        """
        ...


def provider_from_environment(name: str) -> MigrationProvider:
    """The provider named by the settings (``aws`` or ``novita``), configured from the environment."""
    if name == "aws":
        from spotguard_core.migration.providers.aws_ec2 import AwsEc2Provider  # noqa: PLC0415 - load only what is used

        return AwsEc2Provider.from_environment()
    if name == "novita":
        from spotguard_core.migration.providers.novita import NovitaProvider  # noqa: PLC0415

        return NovitaProvider.from_environment()
    raise ValueError(f"unknown migration provider {name!r} (expected 'aws' or 'novita')")
