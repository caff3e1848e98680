"""The one settings object: environment variables prefixed ``EQUIPOISE_`` and an optional TOML file.

Precedence (highest first): explicit keyword arguments, environment variables, the config file named by
``EQUIPOISE_CONFIG``, the embedded defaults. Unknown keys in the file or unknown ``EQUIPOISE_*``
variables are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "EQUIPOISE_"
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
REPO_ROOT = Path(__file__).resolve().parents[1]
FEW_CORES = 4  # up to this many cores, the model gets one intra-op thread by default
# Written only here: also the default of monitoring.collapse.CollapseRules.recall_precision.
MONITOR_RECALL_PRECISION = 0.04
# Written only here: also the default of the monitor's and tier 1's bootstraps over conversations.
MONITOR_BOOTSTRAP_REPLICATES = 200
# Written only here: also the default of retraining.gate_config.GateConfig.macro_f1_tolerance.
GATE_MACRO_F1_TOLERANCE = 0.01
# Written only here: the escalation rule's defaults for batch summaries (scoring.summary) and live streams.
CUSTOMER_SPEAKER = "customer"  # the speaker whose escalations count (compared case-insensitively)
ESCALATION_THRESHOLD = 0.2  # rise of the anger probability over the customer's previous turn
# Written only here: also the default channel limit of model.audio.decode_channels.
MAX_AUDIO_CHANNELS = 8
# Written only here: also the defaults of scoring.calls.CallOptions (whole call recordings).
MAX_CALL_SECONDS = 3_600.0
MAX_CALL_BYTES = 512 * 1024 * 1024


class SettingsError(ValueError):
    """A setting is unknown or malformed; the message names it."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_intra_op_threads(cores: int) -> int:
    """One thread per model call on small hosts: ONNX Runtime's own choice (every core) spins threads that the
    event loop, the prediction log and other processes need, and its throughput collapses under contention."""
    return 1 if cores <= FEW_CORES else 0


def default_audio_intra_op_threads(cores: int) -> int | None:
    """Every core for the calls that carry audio on small hosts (None elsewhere: the text's threads): the speech
    branch is the one long call, which on one thread holds one core while the other idles (text + 3 s audio p50
    27 against 39 ms on 2 cores, saturated throughput within 2%; docs/SPEECH.md "Threads for audio")."""
    return cores if cores <= FEW_CORES else None


def default_batch_workers(cores: int) -> int:
    """On hosts of 2 to FEW_CORES cores, a model thread per core and one more, each with its one intra-op thread:
    while every core scores a batch, the extra thread gathers the next one from the answered clients' new requests,
    where one thread per core left the cores idle between batches. Measured on 2 cores only (three threads against
    two: ahead at concurrency 32 in nine runs of nine, by 1.4-5.6 %, concurrency 1 unchanged; docs/BENCHMARKS.md
    "Serving peers"). One core keeps one thread; larger hosts one call at a time over ONNX Runtime's own pool."""
    return cores + 1 if 2 <= cores <= FEW_CORES else 1


def _default_data_dir() -> Path | None:
    candidate = REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads the file named by EQUIPOISE_CONFIG; a missing named file is an error, not a silent default."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self._values = self._read()

    @staticmethod
    def _read() -> dict[str, Any]:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            return {}
        file = Path(path)
        if not file.is_file():
            raise SettingsError(f"{CONFIG_ENV}={path}: config file not found")
        try:
            return tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise SettingsError(f"{CONFIG_ENV}={path}: not valid TOML ({error})") from error

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # Paths
    state_dir: Path = Field(default=REPO_ROOT / "state", description="Local state: SQLite file, spool, reports.")
    data_dir: Path | None = Field(default_factory=_default_data_dir, description="Corpora (MELD, RAVDESS, ...).")
    registry_dir: Path | None = Field(default=None, description="Model artifacts; default <state_dir>/models.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in state_dir.")

    # Inference
    device: Literal["auto", "cpu", "cuda"] = "auto"
    intra_op_threads: int = Field(
        default_factory=lambda: default_intra_op_threads(available_cores()),
        ge=0,
        le=256,
        description="ONNX Runtime threads per model call; 0 lets it decide. Default: 1 on hosts of at most "
        f"{FEW_CORES} cores (measured on 2, docs/BENCHMARKS.md 'Serving defaults'), else 0.",
    )
    audio_intra_op_threads: int | None = Field(
        default_factory=lambda: default_audio_intra_op_threads(available_cores()),
        ge=1,
        le=256,
        description="ONNX Runtime threads for model calls that carry audio, where the model has a text path for "
        "the others (late fusion); unset: intra_op_threads. Default: every core on hosts of at most "
        f"{FEW_CORES} cores, else unset.",
    )
    precision: Literal["fp32", "int8"] = "fp32"
    # The smallest margin whose int8 labels agree with fp32 on >= 99.5% of MELD train turns for the shipped
    # default (python -m benchmarks.int8_rescoring; docs/BENCHMARKS.md).
    int8_rescore_margin: float = Field(
        default=0.04,
        ge=0,
        lt=1,
        description="int8 only: turns whose top two emotion probabilities are closer are re-scored in fp32 (0: off).",
    )
    packed_text_path: bool = Field(
        default=True,
        description="Score turns without audio on their tokens unpadded where the artifact has the graph for it "
        "(encoder.packed.onnx, fp32): the same answers within 1e-5, about 18% less model CPU per turn in "
        "micro-batches of 16. False: padded calls, as artifacts without it are scored.",
    )
    default_model_dir: Path | None = Field(default=None, description="Champion to register on a new database.")
    shipped_default: bool = Field(
        default=True,
        description="Without default_model_dir, assemble the default shipped in model/default/ and use it.",
    )
    model_poll_interval_s: float = Field(default=5.0, gt=0, description="How often the service checks the champion.")

    # Service
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    auth_enabled: bool | None = Field(default=None, description="Default: off on loopback, required elsewhere.")
    api_key_cache_s: float = Field(default=30.0, ge=0, description="How long a checked API key is trusted.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Python's cyclic garbage collector while serving (core/heap.py; docs/BENCHMARKS.md "The garbage collector").
    gc_freeze: bool = Field(
        default=True, description="Once started, freeze the objects of start-up, which full collections then skip."
    )
    gc_gen0_threshold: int = Field(
        default=10_000,
        ge=1,
        description="Net allocations between two collections of the youngest generation while serving (Python's "
        "default: 700).",
    )

    # Limits (documented in README "Limits")
    max_text_chars: int = Field(default=2_000, ge=1, le=100_000)
    max_audio_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_audio_seconds: float = Field(default=30.0, gt=0, le=600)
    max_audio_channels: int = Field(
        default=MAX_AUDIO_CHANNELS,
        ge=1,
        le=64,
        description="Channels of one audio file; each channel is a speaker of its own (README 'Multi-channel audio').",
    )
    channel_silence_dbfs: float = Field(
        default=-60.0,
        ge=-200,
        le=0,
        description="A channel of a multi-channel recording whose loudest 20 ms is quieter than this (dB full scale) "
        "is reported silent, not scored; the quietest speech clip of the corpora peaks at -51.5 dBFS.",
    )
    # Whole call recordings (scoring.calls): longer and larger than one turn's audio, decoded once per call.
    max_call_seconds: float = Field(
        default=MAX_CALL_SECONDS,
        gt=0,
        le=4 * 3_600,
        description="Longest call recording; a longer one is refused from its header, before it is decoded.",
    )
    max_call_bytes: int = Field(
        default=MAX_CALL_BYTES,
        ge=1024,
        description="Largest call recording file: an hour of 16-bit stereo WAV is 115 MB at 8 kHz, 230 MB at 16 kHz "
        "(at 48 kHz, 691 MB: send FLAC).",
    )
    max_queued_calls: int = Field(
        default=100, ge=1, le=100_000, description="Calls waiting to be processed; beyond it POST /v1/calls is 503."
    )
    call_workers: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Calls processed at once by the service (0: none; another process runs them). Speech to text "
        "and the model already use every core, so on 2 cores a second call only slows the first.",
    )
    call_lease_s: float = Field(
        default=60.0,
        gt=0,
        le=3_600,
        description="A running call's lease, renewed every third of it; a call whose lease ran out (its process "
        "died) is queued again.",
    )
    call_max_attempts: int = Field(default=3, ge=1, le=100, description="Attempts before an abandoned call fails.")
    call_mute_redacted: bool = Field(
        default=True,
        description="With redaction on: silence the redacted words of a call's transcript in its stored recording.",
    )
    max_dialogue_turns: int = Field(default=200, ge=1, le=5_000)
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)

    # Live streams (/v1/stream; a stream holds at most max_dialogue_turns turns; README "Limits")
    stream_max_open: int = Field(default=256, ge=1, le=100_000, description="Open streams per server process.")
    stream_idle_timeout_s: float = Field(
        default=300.0, gt=0, le=86_400, description="A stream with no message and no turn in progress is closed."
    )
    stream_open_timeout_s: float = Field(
        default=10.0, gt=0, le=3_600, description="Time a new connection has to send its `open` message."
    )
    stream_max_message_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, le=1024**3, description="Largest message a stream client may send."
    )
    stream_max_pending_turns: int = Field(
        default=4, ge=1, le=1_000, description="Turns of one stream waiting to be answered; more are refused."
    )
    stream_escalation_threshold: float = Field(
        default=ESCALATION_THRESHOLD,
        ge=0,
        le=1,
        description="Rise of the customer's anger or negative-sentiment probability over their previous turn that "
        "pushes an escalation event.",
    )

    # Micro-batching
    batch_max_size: int = Field(default=32, ge=1, le=1024)
    # Calls, wait and workers measured on 2 cores against the former 32 / 3 ms / 1 (docs/BENCHMARKS.md "Serving
    # peers"): a micro-batch of mixed lengths padded as one call cost 1.8x the model CPU per utterance of
    # length-sorted calls, and the wait added its whole length to a lone request while batches form behind a busy
    # model. Within the limit below, the runtime cuts the sorted micro-batch where padding costs more than a call.
    batch_bucket_size: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Most utterances per ONNX Runtime call: a micro-batch is sorted by length and cut into calls "
        "of at most this many where the padding would cost more than another call, so that short utterances are "
        "not padded to the longest.",
    )
    batch_max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=1_000,
        description="How long a batch waits for more requests after its first (with several model threads, only "
        "until it holds its fair share).",
    )
    batch_workers: int = Field(
        default_factory=lambda: default_batch_workers(available_cores()),
        ge=1,
        le=64,
        description="Model threads scoring micro-batches at once. Default: one per core and one more on hosts of "
        f"2 to {FEW_CORES} cores, else 1.",
    )
    batch_fair_share: bool = Field(
        default=True,
        description="With several model threads, a thread freed while another scores gathers its share of the "
        "requests in service (their recent peak divided by the threads) before it scores, or until a busy thread "
        "finishes; off, it scores whatever is waiting at once (smaller batches, more model CPU per utterance).",
    )
    # Measured throughput x acceptable wait: 5 micro-batches, about 2 s of work at the 84 utterances/s a 2-core
    # host served with half its CPU taken by other jobs, under 1 s when it has it alone (docs/BENCHMARKS.md).
    batch_queue_limit: int = Field(default=160, ge=1, description="Requests waiting for the model before 503.")

    # Prediction logging
    log_predictions: bool = True
    log_flush_rows: int = Field(default=256, ge=1)
    log_flush_interval_s: float = Field(default=0.5, gt=0)
    redact_text: bool = Field(
        default=True,
        description="Redact personal data in stored text and pseudonymise the speaker names and conversation ids "
        "in which it finds some (core/redaction.py).",
    )
    pseudonymise_identifiers: bool = Field(
        default=False, description="With redaction on: store every speaker name and conversation id as its pseudonym."
    )
    pseudonym_key: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="Key of the identifiers' pseudonyms (HMAC-SHA256); default: a random key kept in "
        "<state_dir>/pseudonym.key. Every process writing to one database needs the same key.",
    )
    store_audio: bool = False
    retention_days: int = Field(default=90, ge=1)

    # Monitoring and retraining
    minority_classes: Annotated[tuple[str, ...], NoDecode] = ("sadness", "disgust", "fear")
    monitor_interval_s: float = Field(default=300.0, gt=0)
    monitor_window: int = Field(default=500, ge=10)
    monitor_recall_precision: float = Field(
        default=MONITOR_RECALL_PRECISION,
        gt=0,
        le=1,
        description="95% half-width at which a measured minority recall counts as precise (docs/MONITORING.md).",
    )
    monitor_label_horizon: int = Field(
        default=20_000, ge=1, description="Most labelled predictions a measured minority recall may span."
    )
    monitor_in_service: bool = Field(default=True, description="Run the monitor on a schedule inside `serve`.")
    monitor_bootstrap_replicates: int = Field(
        default=MONITOR_BOOTSTRAP_REPLICATES,
        ge=50,
        le=5_000,
        description="Resamples of a window's conversations behind the estimated prior's and recall's 95% intervals.",
    )
    gate_macro_f1_tolerance: float = Field(
        default=GATE_MACRO_F1_TOLERANCE,
        ge=-1,
        le=1,
        description="The gate promotes only when the lower 95% bound of the macro F1 gain is above minus this "
        "(docs/MONITORING.md 'The gate'); a job's params.gate.macro_f1_tolerance overrides it.",
    )
    audit_share: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="Share of predictions offered for random labelling (answered with `audit: true`; core/audit.py).",
    )

    # Shadow scoring (api/shadow.py; README "Shadow scoring")
    shadow_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of live requests also scored by the challenger in the background, logged and never "
        "answered (0: off; needs log_predictions).",
    )
    shadow_challenger: str | None = Field(
        default=None, description="The registered version that scores in shadow; default: the newest candidate."
    )
    shadow_queue_limit: int = Field(
        default=64, ge=1, le=100_000, description="Shadow requests waiting for the challenger; more are dropped."
    )

    @field_validator("minority_classes", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        return tuple(part.strip() for part in value.split(",") if part.strip()) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        if self.registry_dir is None:
            self.registry_dir = self.state_dir / "models"
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.state_dir / 'equipoise.db'}"
        return self

    @property
    def binds_loopback(self) -> bool:
        return _is_loopback(self.host)

    @property
    def auth_required(self) -> bool:
        return self.auth_enabled if self.auth_enabled is not None else not self.binds_loopback

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlFileSource(settings_cls)


def _is_loopback(host: str) -> bool:
    return host in {"localhost", "::1"} or host.startswith("127.")


def _reject_unknown_environment() -> None:
    known = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields} | {CONFIG_ENV}
    unknown = sorted(key for key in os.environ if key.upper().startswith(ENV_PREFIX) and key.upper() not in known)
    if unknown:
        raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")


def _setting_name(location: tuple[Any, ...]) -> str:
    field = str(location[0]) if location else "?"
    return f"{field} ({ENV_PREFIX}{field.upper()})"


def load_settings(**overrides: Any) -> Settings:
    """Build settings, turning every validation problem into one SettingsError that names the settings."""
    _reject_unknown_environment()
    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = "; ".join(f"{_setting_name(issue['loc'])}: {issue['msg']}" for issue in error.errors())
        raise SettingsError(f"invalid settings: {problems}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return load_settings()


def data_dir_or_exit(given: Path | None) -> Path:
    """The corpora directory for a command-line tool: `given`, else the data_dir setting; exits with a message
    when neither names one."""
    found = given or load_settings().data_dir
    if found is None:
        raise SystemExit(f"no data directory: pass --data-dir or set {ENV_PREFIX}DATA_DIR")
    return found
