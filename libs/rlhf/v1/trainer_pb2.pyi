import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReleaseVerdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RELEASE_VERDICT_UNSPECIFIED: _ClassVar[ReleaseVerdict]
    RELEASE_VERDICT_PROMOTE: _ClassVar[ReleaseVerdict]
    RELEASE_VERDICT_ROLLBACK: _ClassVar[ReleaseVerdict]
RELEASE_VERDICT_UNSPECIFIED: ReleaseVerdict
RELEASE_VERDICT_PROMOTE: ReleaseVerdict
RELEASE_VERDICT_ROLLBACK: ReleaseVerdict

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("version", "pause")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    version: int
    pause: bool
    def __init__(self, version: _Optional[int] = ..., pause: _Optional[bool] = ...) -> None: ...

class DecideRequest(_message.Message):
    __slots__ = ("verdict",)
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    verdict: ReleaseVerdict
    def __init__(self, verdict: _Optional[_Union[ReleaseVerdict, str]] = ...) -> None: ...

class ReleaseStatus(_message.Message):
    __slots__ = ("incumbent_version", "candidate_version", "candidate_share", "incumbent_thumbs_up", "incumbent_thumbs", "candidate_thumbs_up", "candidate_thumbs", "verdict", "difference", "lower", "upper", "elapsed_seconds", "last_decision", "gate")
    INCUMBENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SHARE_FIELD_NUMBER: _ClassVar[int]
    INCUMBENT_THUMBS_UP_FIELD_NUMBER: _ClassVar[int]
    INCUMBENT_THUMBS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_THUMBS_UP_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_THUMBS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_DECISION_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    incumbent_version: int
    candidate_version: int
    candidate_share: float
    incumbent_thumbs_up: int
    incumbent_thumbs: int
    candidate_thumbs_up: int
    candidate_thumbs: int
    verdict: str
    difference: float
    lower: float
    upper: float
    elapsed_seconds: float
    last_decision: str
    gate: ReleaseGate
    def __init__(self, incumbent_version: _Optional[int] = ..., candidate_version: _Optional[int] = ..., candidate_share: _Optional[float] = ..., incumbent_thumbs_up: _Optional[int] = ..., incumbent_thumbs: _Optional[int] = ..., candidate_thumbs_up: _Optional[int] = ..., candidate_thumbs: _Optional[int] = ..., verdict: _Optional[str] = ..., difference: _Optional[float] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ..., elapsed_seconds: _Optional[float] = ..., last_decision: _Optional[str] = ..., gate: _Optional[_Union[ReleaseGate, _Mapping]] = ...) -> None: ...

class GateMeasures(_message.Message):
    __slots__ = ("reward", "reward_scored", "length", "repetition", "kl")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    REWARD_SCORED_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    REPETITION_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    reward: float
    reward_scored: bool
    length: float
    repetition: float
    kl: float
    def __init__(self, reward: _Optional[float] = ..., reward_scored: _Optional[bool] = ..., length: _Optional[float] = ..., repetition: _Optional[float] = ..., kl: _Optional[float] = ...) -> None: ...

class ReleaseGate(_message.Message):
    __slots__ = ("candidate_version", "incumbent_version", "passed", "summary", "candidate", "incumbent", "reward_model_version", "failed")
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    INCUMBENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    INCUMBENT_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    candidate_version: int
    incumbent_version: int
    passed: bool
    summary: str
    candidate: GateMeasures
    incumbent: GateMeasures
    reward_model_version: int
    failed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, candidate_version: _Optional[int] = ..., incumbent_version: _Optional[int] = ..., passed: _Optional[bool] = ..., summary: _Optional[str] = ..., candidate: _Optional[_Union[GateMeasures, _Mapping]] = ..., incumbent: _Optional[_Union[GateMeasures, _Mapping]] = ..., reward_model_version: _Optional[int] = ..., failed: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("kind", "version", "parent_version", "path", "manifest_sha256", "created_at", "metrics", "rolled_back_from")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FROM_FIELD_NUMBER: _ClassVar[int]
    kind: str
    version: int
    parent_version: int
    path: str
    manifest_sha256: str
    created_at: _timestamp_pb2.Timestamp
    metrics: _containers.ScalarMap[str, float]
    rolled_back_from: int
    def __init__(self, kind: _Optional[str] = ..., version: _Optional[int] = ..., parent_version: _Optional[int] = ..., path: _Optional[str] = ..., manifest_sha256: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., rolled_back_from: _Optional[int] = ...) -> None: ...

class ListCheckpointsReply(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ...) -> None: ...

class TrainerStatus(_message.Message):
    __slots__ = ("stage", "step", "policy_version", "kl", "mean_reward", "pending_prompts", "feedback_consumed", "reward_version", "metrics", "paused", "feedback_used", "data_staleness_seconds", "consumer_lag", "phase", "phase_detail", "algorithm", "release", "dropped_prompts")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    MEAN_REWARD_FIELD_NUMBER: _ClassVar[int]
    PENDING_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    REWARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_USED_FIELD_NUMBER: _ClassVar[int]
    DATA_STALENESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_LAG_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PHASE_DETAIL_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    step: int
    policy_version: int
    kl: float
    mean_reward: float
    pending_prompts: int
    feedback_consumed: int
    reward_version: int
    metrics: _containers.ScalarMap[str, float]
    paused: bool
    feedback_used: int
    data_staleness_seconds: float
    consumer_lag: int
    phase: str
    phase_detail: str
    algorithm: str
    release: ReleaseStatus
    dropped_prompts: int
    def __init__(self, stage: _Optional[str] = ..., step: _Optional[int] = ..., policy_version: _Optional[int] = ..., kl: _Optional[float] = ..., mean_reward: _Optional[float] = ..., pending_prompts: _Optional[int] = ..., feedback_consumed: _Optional[int] = ..., reward_version: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., paused: _Optional[bool] = ..., feedback_used: _Optional[int] = ..., data_staleness_seconds: _Optional[float] = ..., consumer_lag: _Optional[int] = ..., phase: _Optional[str] = ..., phase_detail: _Optional[str] = ..., algorithm: _Optional[str] = ..., release: _Optional[_Union[ReleaseStatus, _Mapping]] = ..., dropped_prompts: _Optional[int] = ...) -> None: ...
