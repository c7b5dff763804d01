"""``pgbackflow.toml``: every database, storage and job of a team in one file (docs/CONFIG.md).

:func:`load_config` validates the file (one-line errors naming the file, the key and what is
allowed); :func:`build_plan` turns it into what must exist in Prefect (blocks, work pools,
concurrency limits, deployments, automations); :func:`deploy` compares that with the API and
applies it, idempotently. Secrets are read from environment variables named in the file at
deploy time and go into blocks only: deployment parameters hold block references.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, cast
from urllib.parse import urlsplit

from prefect.blocks.core import Block
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pgbackflow.blocks.database import DB_ID_PATTERN, PostgresDatabase
from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.blocks.storage import LocalStorage, S3Storage
from pgbackflow.deployments.apply import (
    CONFIG_TAG,
    Change,
    DeploymentSpec,
    LimitSpec,
    PrefectPlan,
    ScheduleSpec,
    apply_plan,
    plan_changes,
)
from pgbackflow.deployments.automations import (
    DEFAULT_WAL_SILENCE_S,
    AutomationSpec,
    apply_automation,
    automation_changes,
    disable_automations_of,
    lost_run_automations,
    wal_restart_automations,
)
from pgbackflow.deployments.notifications import (
    ClusterNotify,
    DatabaseNotify,
    HealthInterval,
    NotifyDefaults,
)
from pgbackflow.deployments.physical import (
    physical_backup_specs,
    wal_deployment_name,
    wal_stream_parameters,
    wal_stream_spec,
)
from pgbackflow.deployments.tags import (
    DB_TAG_PREFIX,
    STORAGE_TAG_PREFIX,
    db_tag,
    job_tag,
    storage_tag,
)
from pgbackflow.deployments.verification import (
    PRESETS,
    schedule_cron,
    verification_parameters,
    verification_spec,
)
from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.retention import RetentionSettings
from pgbackflow.tasks.storage.url import parse_storage_url
from pgbackflow.tasks.wal import DEFAULT_PARTIAL_INTERVAL_S, DEFAULT_SLOT

_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"
Name = Annotated[str, Field(pattern=_NAME)]
DbId = Annotated[str, Field(pattern=DB_ID_PATTERN)]
_SCHEDULE = re.compile(
    r"^(?P<preset>hourly|daily|weekly|monthly)(?:\s+(?:at\s+)?(?P<at>\d{1,2}:\d{2}|:\d{2}))?$"
)


def parse_schedule(text: str) -> str:
    """A UTC cron expression from ``daily at 02:00``, ``hourly at :15``, ``weekly``, ... or cron.

    Weekly runs on Sundays, monthly on the 1st; without a time: 01:00 (hourly: minute 0).
    """
    spec = " ".join(text.split())
    match = _SCHEDULE.match(spec)
    if match:
        at = match.group("at") or ("00:00" if match.group("preset") == "hourly" else "01:00")
        if at.startswith(":"):
            at = "00" + at
        return schedule_cron(match.group("preset"), at)
    if len(spec.split()) == 5:
        return schedule_cron(None, cron=spec)
    raise ConfigError(
        f"{text!r} is not a schedule: use {', '.join(sorted(PRESETS))} with an optional "
        "'at HH:MM' (hourly: 'at :MM'), or a 5-field UTC cron expression"
    )


class _Strict(BaseModel):
    # Strict: TOML has real types, and `port = true` must not become port 1.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")


def check_host(value: str, *, socket_folder: bool) -> str:
    """``value`` if it is a host name, an IP address or (``socket_folder``) the absolute
    folder of a Unix socket; else ValueError. The value is not repeated in the error: a
    DSN pasted into ``host`` holds a password."""
    if len(value) <= 253 and _HOSTNAME.fullmatch(value):
        return value
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(value)
        return value
    if (socket_folder and value.startswith("/") and len(value) <= 107 and value.isprintable()
            and not any(c.isspace() for c in value)):
        return value
    raise ValueError(
        f"is not a host name, an IP address{' or a socket folder' if socket_folder else ''} "
        f"({len(value)} characters): give the host alone (the user goes in user = and the "
        "password in an environment variable named by password_env =)"
    )


class PrefectSection(_Strict):
    """Where the jobs run."""

    work_pool: Name = "pgbackflow"
    verification_pool: Name | None = None


class KeySection(_Strict):
    """The master key every worker shares: a BackupEncryptionKey block, or a key file path."""

    block: Name | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> KeySection:
        if self.block is None and self.file is None:
            raise ValueError("name a key block (block = NAME) or a key file (file = PATH)")
        if self.file is not None and not self.file.startswith("/"):
            raise ValueError(f"file {self.file!r} is not an absolute path")
        return self


class StorageSection(_Strict):
    """A storage: an existing block, or a URL from which a block is made."""

    block: str | None = None
    url: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key_env: str | None = None
    maintenance: str = "daily at 03:30"

    @field_validator("maintenance")
    @classmethod
    def _maintenance(cls, value: str) -> str:
        return DatabaseSection._schedule(value or None) or ""

    @model_validator(mode="after")
    def _one_of(self) -> StorageSection:
        if (self.block is None) == (self.url is None):
            raise ValueError("give exactly one of url = ... or block = ...")
        if self.url is not None and not (self.url.startswith(("/", "file://", "s3://"))):
            raise ValueError(f"url {self.url!r} is not /path, file:///path or s3://bucket/prefix")
        if self.endpoint_url is not None:
            try:
                endpoint = urlsplit(self.endpoint_url)
                credentials = endpoint.username is not None or endpoint.password is not None
            except ValueError:
                raise ValueError("endpoint_url is not a URL: use http://host:port or "
                                 "https://host") from None
            if credentials or endpoint.query or endpoint.fragment:
                # Not repeated: what is in it may be a secret.
                raise ValueError(
                    "endpoint_url holds credentials, a query or a fragment: give only "
                    "https://host[:port]; the key id goes in access_key_id = and the secret "
                    "in an environment variable named by secret_access_key_env =")
        return self


class SshSection(_Strict):
    """An SSH bastion every connection to the server goes through (tasks/tunnel.py)."""

    host: str
    port: int = Field(default=22, ge=1, le=65535)
    user: str
    private_key_file: str | None = None
    private_key_env: str | None = None
    host_key: str

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return check_host(value, socket_folder=False)

    @model_validator(mode="after")
    def _one_key(self) -> SshSection:
        if (self.private_key_file is None) == (self.private_key_env is None):
            raise ValueError(
                "give exactly one of private_key_file = PATH or private_key_env = VARIABLE"
            )
        if not self.host_key.strip():
            raise ValueError(
                f"host_key is empty: put the bastion's public host key there "
                f"(ssh-keyscan -p {self.port} {self.host}, checked with its administrator)"
            )
        return self

    def private_key(self, where: str) -> SecretStr:
        """The private key, read at deploy time (it is stored in the block only)."""
        if self.private_key_env is not None:
            secret = _env_secret(self.private_key_env, f"{where}.private_key_env")
            assert secret is not None
            return secret
        assert self.private_key_file is not None
        try:
            return SecretStr(Path(self.private_key_file).read_text())
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
            raise ConfigError(
                f"{where}.private_key_file: {self.private_key_file} cannot be read ({reason})"
            ) from None


class ServerSection(_Strict):
    """A PostgreSQL server: an existing PostgresDatabase block, or connection details."""

    block: str | None = None
    host: str | None = None
    port: int = Field(default=5432, ge=1, le=65535)
    user: str = "postgres"
    password_env: str | None = None
    maintenance_database: str = "postgres"
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = (
        "prefer"
    )
    max_concurrent_backups: int = Field(default=2, ge=1, le=1000)
    ssh: SshSection | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return None if value is None else check_host(value, socket_folder=True)

    @model_validator(mode="after")
    def _one_of(self) -> ServerSection:
        if (self.block is None) == (self.host is None):
            raise ValueError("give exactly one of host = ... or block = ...")
        if self.block is not None and self.ssh is not None:
            raise ValueError("ssh is for servers described here: set it in the block instead")
        return self


class DatabaseSection(_Strict):
    """Logical backups (and their verification) of one database, or of all of a server's."""

    server: Name
    database: str | None = None
    exclude: list[str] = Field(default_factory=list)
    storages: list[Name] = Field(min_length=1)
    backup: str = "daily at 01:00"
    verify: str | None = None
    verify_sandbox: Literal["docker", "local"] = "docker"
    retention: RetentionSettings | None = None
    notify: DatabaseNotify | None = None
    health_check: HealthInterval = "1m"
    enabled: bool = True

    @field_validator("backup", "verify")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_schedule(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _all(self) -> DatabaseSection:
        if self.exclude and self.database != "all":
            raise ValueError("exclude is only for database = \"all\"")
        if self.verify and self.database == "all":
            raise ValueError(
                "verify is not available with database = \"all\" yet: give the databases "
                "to verify their own entries"
            )
        return self


class ClusterSection(_Strict):
    """Physical backups of a whole server: fulls, incrementals (PG 17+), continuous WAL."""

    server: Name
    storages: list[Name] = Field(min_length=1)
    full: str = "weekly at 01:00"
    incremental: str | None = "hourly at :30"
    wal: bool = True
    slot: str = Field(default=DEFAULT_SLOT, pattern=r"^[a-z0-9_]{1,63}$")
    spool_dir: str | None = None
    partial_interval_s: float = Field(default=DEFAULT_PARTIAL_INTERVAL_S, gt=0,
                                      allow_inf_nan=False)
    wal_silence_s: float = Field(default=DEFAULT_WAL_SILENCE_S, ge=120, allow_inf_nan=False)
    retention: RetentionSettings | None = None
    notify: ClusterNotify | None = None
    health_check: HealthInterval = "1m"
    enabled: bool = True

    @field_validator("full", "incremental")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return DatabaseSection._schedule(value or None)


class DeployConfig(_Strict):
    """The whole file."""

    prefect: PrefectSection = Field(default_factory=PrefectSection)
    key: KeySection
    storages: dict[Name, StorageSection] = Field(min_length=1)
    servers: dict[Name, ServerSection] = Field(min_length=1)
    databases: dict[DbId, DatabaseSection] = Field(default_factory=dict)
    clusters: dict[DbId, ClusterSection] = Field(default_factory=dict)
    notify: NotifyDefaults | None = None

    @model_validator(mode="after")
    def _references(self) -> DeployConfig:
        for kind, entries in (("databases", self.databases), ("clusters", self.clusters)):
            for entry_id, entry in entries.items():
                if entry.server not in self.servers:
                    raise ValueError(
                        f"{kind}.{entry_id}.server: no server {entry.server!r} in [servers] "
                        f"(have: {', '.join(sorted(self.servers))})"
                    )
                for storage in entry.storages:
                    if storage not in self.storages:
                        raise ValueError(
                            f"{kind}.{entry_id}.storages: no storage {storage!r} in [storages] "
                            f"(have: {', '.join(sorted(self.storages))})"
                        )
        both = set(self.databases) & set(self.clusters)
        if both:
            raise ValueError(f"ids used by a database and a cluster: {', '.join(sorted(both))}")
        places: dict[tuple[str, ...], str] = {}
        for name, section in self.storages.items():
            place = _storage_place(section)
            if place is not None and places.setdefault(place, name) != name:
                raise ValueError(
                    f"storages.{places[place]} and storages.{name} are the same place: name "
                    "it once (a second copy needs another folder or bucket)")
        folded: dict[str, str] = {}
        for entry_id in [*self.databases, *self.clusters]:
            other = folded.setdefault(entry_id.casefold(), entry_id)
            if other != entry_id:
                # Their folders would be one on a case-insensitive file system (a NAS).
                raise ValueError(f"ids {other!r} and {entry_id!r} differ only in case: "
                                 "rename one")
        return self


def _storage_place(storage: StorageSection) -> tuple[str, ...] | None:
    """Where a storage described by a URL is, however spelled (None: a block, or a URL
    whose own check reports it)."""
    if storage.url is None:
        return None
    try:
        url = parse_storage_url(storage.url)
    except ConfigError:
        return None
    if url.scheme == "file":
        return ("file", os.path.normpath(url.location))
    return ("s3", url.location, url.prefix.strip("/"), storage.endpoint_url or "")


def load_config(path: Path) -> DeployConfig:
    """Read and validate a deploy config.

    Raises:
        ConfigError: one line: the file, the key, what is wrong and what is allowed.
    """
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    try:
        return DeployConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(part if isinstance(part, str) and part.isprintable() else
                     str(part) if isinstance(part, int) else repr(part)
                     for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        parent = error["loc"][:-1]
        message = f"unknown key; allowed: {', '.join(_allowed_keys(parent))}"
    elif error["type"] == "string_pattern_mismatch":
        pattern = str(error.get("ctx", {}).get("pattern", ""))
        if pattern == _NAME:
            message = "use lowercase letters, digits and '-' (up to 63), starting with one of them"
        elif pattern == DB_ID_PATTERN:
            message = "use up to 100 letters, digits, '.', '_' and '-'"
        else:
            message = f"does not match {pattern}"
        message = f"{error['input']!r} is invalid: {message}"
    elif error["type"] == "missing":
        message = "missing"
    return f"{where}: {message}" if where else message


def _allowed_keys(location: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = DeployConfig
    for part in location:
        field_info = model.model_fields.get(str(part))
        if field_info is None:  # a dict key (entry name): its value model
            continue
        annotation = field_info.annotation
        inner = getattr(annotation, "__args__", None)
        # dict[K, Model]: the value model; Model | None: the model.
        for candidate in reversed(inner) if inner else (annotation,):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
    return sorted(model.model_fields)


# ---------------------------------------------------------------------------------------
# From config to Prefect objects


@dataclass(frozen=True)
class BlockSpec:
    """A block the deploy writes (``make`` builds it; secrets read from the environment)."""

    kind: type[Block]
    name: str
    make: Callable[[], Block]

    @property
    def label(self) -> str:
        """``slug/name`` as in ``block:`` references."""
        return f"{self.kind.get_block_type_slug()}/{self.name}"


@dataclass
class DeployPlan:
    """Everything a config asks for."""

    blocks: list[BlockSpec] = field(default_factory=list)
    #: ``slug/name`` of existing blocks the config references (must exist).
    referenced_blocks: list[tuple[type[Block], str]] = field(default_factory=list)
    prefect: PrefectPlan = field(default_factory=PrefectPlan)
    automations: list[AutomationSpec] = field(default_factory=list)
    #: Clusters whose WAL streamer deployment is wanted: (db_id, silence_s).
    wal_streams: list[tuple[str, float]] = field(default_factory=list)
    #: ``db:<id>`` and ``storage:<name>`` tags of everything the config holds (others are
    #: paused).
    db_tags: set[str] = field(default_factory=set)
    #: Ids whose notification automations the config manages (ones it no longer wants are
    #: paused).
    notify_scope: set[str] = field(default_factory=set)


def _ref(kind: type[Block], name: str) -> dict[str, Any]:
    """A deferred block reference: resolved to a document id when applied."""
    return {"$pgbackflow_block": f"{kind.get_block_type_slug()}/{name}"}


def _env_secret(variable: str | None, what: str) -> SecretStr | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(
            f"{what}: environment variable {variable} is not set: export the secret there "
            "before deploying (it is stored only in the block)"
        )
    return SecretStr(value)


def build_plan(config: DeployConfig) -> DeployPlan:
    """What must exist in Prefect for this config (block references still by name)."""
    plan = DeployPlan()
    pool = config.prefect.work_pool
    verify_pool = config.prefect.verification_pool or pool
    plan.prefect.pools = sorted({pool, verify_pool})

    storage_refs: dict[str, dict[str, Any]] = {}
    storage_urls: dict[str, str] = {}
    for name, storage in config.storages.items():
        kind, block_name = _storage_block(plan, name, storage)
        storage_refs[name] = _ref(kind, block_name)
        storage_urls[name] = f"block:{kind.get_block_type_slug()}/{block_name}"

    server_refs: dict[str, dict[str, Any]] = {}
    for name, server in config.servers.items():
        if server.block is not None:
            plan.referenced_blocks.append((PostgresDatabase, server.block))
            server_refs[name] = _ref(PostgresDatabase, server.block)
        else:
            plan.blocks.append(BlockSpec(PostgresDatabase, name, _server_maker(name, server)))
            server_refs[name] = _ref(PostgresDatabase, name)
            plan.prefect.limits.append(
                LimitSpec(_server_limit(server), server.max_concurrent_backups)
            )

    key_parameters: dict[str, Any]
    if config.key.block is not None:
        key_file = config.key.file
        plan.blocks.append(BlockSpec(
            BackupEncryptionKey, config.key.block, lambda: _key_block(config.key.block, key_file)
        ))
        key_parameters = {"encryption_key": _ref(BackupEncryptionKey, config.key.block)}
        verify_key = {"encryption_key_block": config.key.block}
    else:
        assert config.key.file is not None
        key_parameters = {"key_file": config.key.file}
        verify_key = {"key_file": config.key.file}

    for db_id, database in config.databases.items():
        server = config.servers[database.server]
        tags = (f"server:{database.server}",)
        parameters: dict[str, Any] = {
            "database": server_refs[database.server],
            "storages": [storage_refs[s] for s in database.storages],
            **key_parameters,
        }
        plan.db_tags.add(db_tag(db_id))
        schedule = ScheduleSpec(cron=parse_schedule(database.backup))
        if database.database == "all":
            from pgbackflow.flows.server_backup import backup_databases

            parameters = {"server": parameters.pop("database"), **parameters,
                          "id_prefix": db_id, "exclude": database.exclude}
            flow: Any = backup_databases
        else:
            from pgbackflow.flows.logical_backup import logical_backup

            parameters.update(database_name=database.database or db_id, db_id=db_id)
            flow = logical_backup
            plan.prefect.limits.append(LimitSpec(f"pgbackflow-backup-{db_id}", 1))
        plan.prefect.deployments.append(DeploymentSpec(
            flow=flow, name=f"logical-{db_id}", work_pool=pool, parameters=parameters,
            schedule=schedule, paused=not database.enabled,
            tags=(db_tag(db_id), job_tag("logical"), *tags),
            description=(f"Logical backup of {database.database or db_id} on {database.server}"
                         f" ({schedule.describe()})"),
        ))
        if database.verify is not None:
            spec = verification_spec(
                db_id,
                verification_parameters(db_id, storage_urls[database.storages[0]],
                                        sandbox=database.verify_sandbox, **verify_key),
                verify_pool, cron=parse_schedule(database.verify), tags=tags,
            )
            plan.prefect.deployments.append(
                replace(spec, paused=not database.enabled)
            )
        del server

    for db_id, cluster in config.clusters.items():
        tags = (f"server:{cluster.server}",)
        parameters = {
            "database": server_refs[cluster.server],
            "storages": [storage_refs[s] for s in cluster.storages],
            **key_parameters,
        }
        plan.db_tags.add(db_tag(db_id))
        for spec in physical_backup_specs(
            parameters, db_id=db_id, pool=pool, full_cron=parse_schedule(cluster.full),
            incremental_cron=parse_schedule(cluster.incremental) if cluster.incremental else None,
            tags=tags,
        ):
            plan.prefect.deployments.append(
                replace(spec, paused=not cluster.enabled)
            )
        if cluster.wal:
            wal_parameters = wal_stream_parameters(
                parameters, slot=cluster.slot, spool_dir=cluster.spool_dir,
                partial_interval_s=cluster.partial_interval_s,
            )
            spec = wal_stream_spec(wal_parameters, db_id=db_id, pool=pool, slot=cluster.slot,
                                   tags=tags)
            plan.prefect.deployments.append(
                replace(spec, paused=not cluster.enabled)
            )
            if cluster.enabled:
                plan.wal_streams.append((db_id, cluster.wal_silence_s))
    maintenance_specs = _maintenance_specs(config, storage_refs, server_refs, key_parameters,
                                           pool)
    plan.prefect.deployments += maintenance_specs
    # A storage dropped from the config (or its maintenance switched off): paused.
    plan.db_tags |= {t for spec in maintenance_specs for t in spec.tags
                     if t.startswith(STORAGE_TAG_PREFIX)}
    # Every deployment sends heartbeats: a run whose worker host died is marked Crashed.
    plan.automations += lost_run_automations()
    from pgbackflow.deployments.notifications import (
        config_automations,
        config_scope,
        health_specs,
    )

    plan.automations += config_automations(config)
    plan.notify_scope = config_scope(config)
    plan.prefect.deployments += health_specs(config, server_refs, pool)
    plan.prefect.deployments = [
        replace(spec, tags=(*spec.tags, CONFIG_TAG)) for spec in plan.prefect.deployments
    ]
    return plan


def _maintenance_specs(
    config: DeployConfig, storage_refs: dict[str, dict[str, Any]],
    server_refs: dict[str, dict[str, Any]], key_parameters: dict[str, Any], pool: str,
) -> list[DeploymentSpec]:
    """One scheduled ``maintenance`` deployment per storage: the retention policies of the
    databases and clusters stored there (``database = "all"``: by id pattern ``<id>-*``),
    and the servers of those clusters (their inactive replication slots are reported)."""
    from pgbackflow.flows.maintenance import maintenance

    specs = []
    for name, storage in config.storages.items():
        if not storage.maintenance:
            continue
        policies: dict[str, Any] = {}
        entries: list[tuple[str, DatabaseSection | ClusterSection]] = [
            *config.databases.items(), *config.clusters.items()]
        for entry_id, entry in entries:
            if name not in entry.storages or entry.retention is None:
                continue
            every = isinstance(entry, DatabaseSection) and entry.database == "all"
            policies[f"{entry_id}-*" if every else entry_id] = entry.retention.model_dump(
                exclude_defaults=True)
        clusters = {cluster_id: server_refs[cluster.server]
                    for cluster_id, cluster in config.clusters.items()
                    if name in cluster.storages}
        schedule = ScheduleSpec(cron=parse_schedule(storage.maintenance))
        specs.append(DeploymentSpec(
            flow=maintenance, name=f"maintenance-{name}", work_pool=pool,
            parameters={"storage": storage_refs[name], "policies": policies,
                        **({"clusters": clusters} if clusters else {}), **key_parameters},
            schedule=schedule, collision="CANCEL_NEW",
            tags=(job_tag("maintenance"), storage_tag(name)),
            description=(f"Retention and orphan sweep of storage {name} "
                         f"({schedule.describe()}; {len(policies)} policies)"),
        ))
    return specs


def _server_limit(server: ServerSection) -> str:
    from pgbackflow.flows.logical_backup import server_limit_name

    assert server.host is not None
    return server_limit_name(server.host, server.port)


def _storage_block(
    plan: DeployPlan, name: str, storage: StorageSection
) -> tuple[type[Block], str]:
    if storage.block is not None:
        slug, _, block_name = storage.block.removeprefix("block:").rpartition("/")
        kinds: dict[str, type[Block]] = {
            LocalStorage.get_block_type_slug(): LocalStorage,
            S3Storage.get_block_type_slug(): S3Storage,
        }
        if slug not in kinds:
            raise ConfigError(
                f"storages.{name}.block: {storage.block!r} is not a storage block: use "
                f"{LocalStorage.get_block_type_slug()}/NAME or "
                f"{S3Storage.get_block_type_slug()}/NAME"
            )
        plan.referenced_blocks.append((kinds[slug], block_name))
        return kinds[slug], block_name
    assert storage.url is not None
    url = storage.url

    def make() -> Block:
        from pgbackflow.blocks.storage import storage_block_from_url

        block = storage_block_from_url(url)
        if isinstance(block, S3Storage):
            from pgbackflow.tasks.storage.s3 import check_bucket_name

            try:  # what every run would refuse, refused now
                check_bucket_name(block.bucket)
            except ConfigError as exc:
                raise ConfigError(f"storages.{name}.url: {exc}") from None
            block = block.model_copy(update={
                "endpoint_url": storage.endpoint_url or block.endpoint_url,
                "region": storage.region or block.region,
                "access_key_id": storage.access_key_id,
                "secret_access_key": _env_secret(storage.secret_access_key_env,
                                                 f"storages.{name}.secret_access_key_env"),
            })
        elif storage.endpoint_url or storage.access_key_id or storage.secret_access_key_env:
            raise ConfigError(f"storages.{name}: S3 settings given for a local folder {url!r}")
        return block

    kind: type[Block] = S3Storage if url.startswith("s3://") else LocalStorage
    plan.blocks.append(BlockSpec(kind, name, make))
    return kind, name


def _server_maker(name: str, server: ServerSection) -> Callable[[], Block]:
    def make() -> Block:
        assert server.host is not None
        ssh = server.ssh
        block = PostgresDatabase(
            host=server.host, port=server.port, user=server.user,
            database=server.maintenance_database, sslmode=server.sslmode,
            password=_env_secret(server.password_env, f"servers.{name}.password_env"),
            **({} if ssh is None else {
                "ssh_host": ssh.host, "ssh_port": ssh.port, "ssh_user": ssh.user,
                "ssh_private_key": ssh.private_key(f"servers.{name}.ssh"),
                "ssh_host_key": ssh.host_key,
            }),
        )
        if (bastion := block.bastion()) is not None:
            try:  # what every run's tunnel would refuse, refused now
                bastion.check()
                bastion.known_hosts()
                bastion.key_material()
            except ConfigError as exc:
                raise ConfigError(f"servers.{name}.ssh: {exc}") from None
        return block

    return make


def _key_block(name: str | None, key_file: str | None) -> Block:
    """The key block: kept as it is when it exists, else made from the key file."""
    from pgbackflow.tasks.keys import load_key_file

    assert name is not None
    try:
        return cast(Block, BackupEncryptionKey.load(name))  # sync in a sync context
    except ValueError:
        if key_file is None:
            raise ConfigError(
                f"key.block: BackupEncryptionKey block {name!r} does not exist: create it in "
                "the Prefect UI, or give key.file = PATH to create it from a key file"
            ) from None
        return BackupEncryptionKey(key=SecretStr(load_key_file(Path(key_file)).to_text()))


# ---------------------------------------------------------------------------------------
# Deploy


@dataclass
class DeployResult:
    """What a deploy did (or, for a dry run, would do)."""

    changes: list[Change]
    paused_automations: list[str] = field(default_factory=list)
    started_streamers: list[str] = field(default_factory=list)
    #: Clusters whose WAL streamer deployment this deploy paused.
    paused_streamers: list[str] = field(default_factory=list)
    #: Databases whose remembered health state this deploy deletes (no check of it runs).
    forgotten_states: list[str] = field(default_factory=list)

    def render(self) -> str:
        """The plan as a diff, and a summary line."""
        lines = [c.render() for c in self.changes if c.action != "="]
        counts = {a: sum(1 for c in self.changes if c.action == a) for a in "+~-="}
        lines.append(
            f"{counts['+']} to create, {counts['~']} to update, {counts['-']} to pause, "
            f"{counts['=']} unchanged"
        )
        lines += [f"paused automation {name}" for name in self.paused_automations]
        lines += [f"started WAL streamer {name}" for name in self.started_streamers]
        # Pausing a deployment ends no run: the streamer goes on, and once it stops, its
        # slot makes the server keep WAL until its disk is full.
        lines += [f"paused WAL streaming of {name}: a streamer still running goes on, and the "
                  "replication slot keeps WAL on the server; `pgbackflow physical-retire "
                  f"--db-id {name}` stops it and drops the slot" for name in
                  self.paused_streamers]
        lines += [f"- health state {name}: no health check of it runs, it leaves `pgbackflow "
                  "status`" for name in self.forgotten_states]
        return "\n".join(lines)


def deploy(config: DeployConfig, *, dry_run: bool = False) -> DeployResult:
    """Create or update everything the config names; pause what it no longer names."""
    plan = build_plan(config)
    changes: list[Change] = []
    built: dict[str, Block] = {}
    for block_spec in plan.blocks:
        block = block_spec.make()
        built[block_spec.label] = block
        changes.append(_block_change(block_spec, block))
    for kind, name in plan.referenced_blocks:
        if _block_id(kind, name) is None:
            raise ConfigError(
                f"block {kind.get_block_type_slug()}/{name} named in the config does not "
                "exist: create it in the Prefect UI, or describe it in the config instead"
            )
    if not dry_run:
        for block_spec in plan.blocks:
            if next(c for c in changes if c.name == block_spec.label).action != "=":
                built[block_spec.label].save(block_spec.name, overwrite=True)
    plan.prefect.deployments = [_resolve_refs(spec, dry_run) for spec in plan.prefect.deployments]
    deployment_changes = plan_changes(plan.prefect, keep_tags=plan.db_tags)
    changes += deployment_changes
    result = DeployResult(changes)
    from pgbackflow.deployments.notifications import pause_automations, stale_automations

    stale = stale_automations([s.name for s in plan.automations], plan.notify_scope)
    from pgbackflow.flows.health import forget_states, unchecked_states

    checked = {tag.removeprefix(DB_TAG_PREFIX) for spec in plan.prefect.deployments
               if not spec.paused and job_tag("health") in spec.tags
               for tag in spec.tags if tag.startswith(DB_TAG_PREFIX)}
    if dry_run:
        result.forgotten_states = unchecked_states(checked)
        for action, spec in automation_changes(plan.automations):
            changes.append(Change(action, "automation", spec.name))  # type: ignore[arg-type]
        changes += [Change("-", "automation", name, ("paused: no longer in the config",))
                    for name, _ in stale]
        return result
    ids = apply_plan(plan.prefect, deployment_changes)
    # After the pauses: a health check still running saves its state, then finds its
    # deployment paused and deletes it (flows/health.py), so no interleaving keeps a state.
    result.forgotten_states = forget_states(keep=checked)
    automations = list(plan.automations)
    for db_id, silence_s in plan.wal_streams:
        wal_id = next(v for k, v in ids.items() if k.endswith("/" + wal_deployment_name(db_id)))
        automations += wal_restart_automations(db_id, wal_id, silence_s)
    for action, spec in automation_changes(automations):
        changes.append(Change(action, "automation", spec.name))  # type: ignore[arg-type]
        apply_automation(spec)
    changes += [Change("-", "automation", name, ("paused: no longer in the config",))
                for name, _ in stale]
    pause_automations(stale)
    for change in deployment_changes:
        if change.action == "-":
            tags = _deployment_tags(change.name)
            for owner, job in _owners_of(tags, plan.db_tags):
                result.paused_automations += disable_automations_of(owner, job)
                if job in (None, "wal-stream") and job_tag("wal") in tags:
                    result.paused_streamers.append(owner)
    from pgbackflow.deployments.physical import start_streamer

    for db_id, _ in plan.wal_streams:
        wal_id = next(v for k, v in ids.items() if k.endswith("/" + wal_deployment_name(db_id)))
        if start_streamer(wal_id) is not None:
            result.started_streamers.append(db_id)
    return result


def _deployment_tags(full_name: str) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return list(client.read_deployment_by_name(full_name).tags)


def _owners_of(tags: list[str], in_config: set[str]) -> list[tuple[str, str | None]]:
    """Whose automations pausing a deployment with these tags pauses: the databases' that
    left the config (``in_config``: their tags; all of their automations), for a job
    switched off on a database still in the config only the WAL streamer's restart
    automations (its notifications are the config's, paused as stale with the job; a
    restart would start the paused streamer again), and for a storage's maintenance
    deployment that storage's maintenance notifications (a storage left out of the config
    is no longer in the notifications' scope)."""
    owners: list[tuple[str, str | None]] = []
    for tag in tags:
        if not tag.startswith(DB_TAG_PREFIX):
            continue
        if tag not in in_config:
            owners.append((tag.removeprefix(DB_TAG_PREFIX), None))
        elif job_tag("wal") in tags:
            owners.append((tag.removeprefix(DB_TAG_PREFIX), "wal-stream"))
    if job_tag("maintenance") in tags:
        owners += [(t.removeprefix(STORAGE_TAG_PREFIX), "maintenance") for t in tags
                   if t.startswith(STORAGE_TAG_PREFIX)]
    return owners


def _block_change(spec: BlockSpec, block: Block) -> Change:
    try:
        current = spec.kind.load(spec.name)
    except ValueError:
        return Change("+", "block", spec.label)
    differences = []
    for name in type(block).model_fields:
        old, new = getattr(current, name), getattr(block, name)
        if isinstance(new, SecretStr) or isinstance(old, SecretStr):
            old_text = old.get_secret_value() if isinstance(old, SecretStr) else old
            new_text = new.get_secret_value() if isinstance(new, SecretStr) else new
            if old_text != new_text:
                differences.append(f"{name}: (secret changed)")
        elif old != new:
            differences.append(f"{name}: {old!r} → {new!r}")
    return Change("~" if differences else "=", "block", spec.label, tuple(differences))


def _block_id(kind: type[Block], name: str) -> str | None:
    from pgbackflow.deployments.block_refs import find_saved_block

    document = find_saved_block(kind.get_block_type_slug(), name)
    return None if document is None else str(document.id)


_BLOCK_KINDS: dict[str, type[Block]] = {
    kind.get_block_type_slug(): kind
    for kind in (PostgresDatabase, BackupEncryptionKey, LocalStorage, S3Storage)
}


def _resolve_refs(spec: DeploymentSpec, dry_run: bool) -> DeploymentSpec:
    """Replace deferred block references by Prefect ``$ref``s to the saved documents."""

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"$pgbackflow_block"}:
                slug, _, name = str(value["$pgbackflow_block"]).partition("/")
                kind = _BLOCK_KINDS[slug]
                document_id = _block_id(kind, name)
                if document_id is None:
                    if dry_run:  # created by this deploy
                        return {"$ref": {"block_document_id": f"(new {slug}/{name})"}}
                    raise ConfigError(
                        f"block {slug}/{name} does not exist: create it in the Prefect UI or "
                        "let the config define it"
                    )
                return {"$ref": {"block_document_id": document_id}}
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    return replace(spec, parameters=resolve(dict(spec.parameters)))
