import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from rlhf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Thumb(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THUMB_UNSPECIFIED: _ClassVar[Thumb]
    THUMB_UP: _ClassVar[Thumb]
    THUMB_DOWN: _ClassVar[Thumb]

class CheckpointKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKPOINT_KIND_UNSPECIFIED: _ClassVar[CheckpointKind]
    CHECKPOINT_KIND_POLICY: _ClassVar[CheckpointKind]
    CHECKPOINT_KIND_REWARD: _ClassVar[CheckpointKind]
THUMB_UNSPECIFIED: Thumb
THUMB_UP: Thumb
THUMB_DOWN: Thumb
CHECKPOINT_KIND_UNSPECIFIED: CheckpointKind
CHECKPOINT_KIND_POLICY: CheckpointKind
CHECKPOINT_KIND_REWARD: CheckpointKind

class GenerationEvent(_message.Message):
    __slots__ = ("generation_id", "messages", "prompt", "response", "prompt_token_ids", "response_token_ids", "response_logprobs", "policy_version", "sampling", "finish_reason", "created_at")
    GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    generation_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    prompt: str
    response: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_logprobs: _containers.RepeatedScalarFieldContainer[float]
    policy_version: int
    sampling: _common_pb2.SamplingParams
    finish_reason: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, generation_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., prompt: _Optional[str] = ..., response: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., response_token_ids: _Optional[_Iterable[int]] = ..., response_logprobs: _Optional[_Iterable[float]] = ..., policy_version: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., finish_reason: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Ranking(_message.Message):
    __slots__ = ("generation_ids",)
    GENERATION_IDS_FIELD_NUMBER: _ClassVar[int]
    generation_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, generation_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Correction(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ScalarScore(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: float
    def __init__(self, value: _Optional[float] = ...) -> None: ...

class Feedback(_message.Message):
    __slots__ = ("generation_id", "idempotency_key", "thumb", "ranking", "correction", "score", "comment", "tags", "user_key")
    GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    THUMB_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    USER_KEY_FIELD_NUMBER: _ClassVar[int]
    generation_id: str
    idempotency_key: str
    thumb: Thumb
    ranking: Ranking
    correction: Correction
    score: ScalarScore
    comment: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    user_key: str
    def __init__(self, generation_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., thumb: _Optional[_Union[Thumb, str]] = ..., ranking: _Optional[_Union[Ranking, _Mapping]] = ..., correction: _Optional[_Union[Correction, _Mapping]] = ..., score: _Optional[_Union[ScalarScore, _Mapping]] = ..., comment: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., user_key: _Optional[str] = ...) -> None: ...

class FeedbackEvent(_message.Message):
    __slots__ = ("event_id", "tenant", "feedback", "policy_version", "received_at")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    tenant: str
    feedback: Feedback
    policy_version: int
    received_at: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., tenant: _Optional[str] = ..., feedback: _Optional[_Union[Feedback, _Mapping]] = ..., policy_version: _Optional[int] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CheckpointEvent(_message.Message):
    __slots__ = ("kind", "version", "parent_version", "path", "manifest_sha256", "created_at", "metrics")
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
    kind: CheckpointKind
    version: int
    parent_version: int
    path: str
    manifest_sha256: str
    created_at: _timestamp_pb2.Timestamp
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, kind: _Optional[_Union[CheckpointKind, str]] = ..., version: _Optional[int] = ..., parent_version: _Optional[int] = ..., path: _Optional[str] = ..., manifest_sha256: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ReleaseEvent(_message.Message):
    __slots__ = ("incumbent_version", "incumbent_manifest_sha256", "candidate_version", "candidate_manifest_sha256", "candidate_share", "reason", "decided_at")
    INCUMBENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    INCUMBENT_MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SHARE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    incumbent_version: int
    incumbent_manifest_sha256: str
    candidate_version: int
    candidate_manifest_sha256: str
    candidate_share: float
    reason: str
    decided_at: _timestamp_pb2.Timestamp
    def __init__(self, incumbent_version: _Optional[int] = ..., incumbent_manifest_sha256: _Optional[str] = ..., candidate_version: _Optional[int] = ..., candidate_manifest_sha256: _Optional[str] = ..., candidate_share: _Optional[float] = ..., reason: _Optional[str] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("source_topic", "partition", "offset", "key", "value", "reason", "consumer_group", "failed_at")
    SOURCE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    FAILED_AT_FIELD_NUMBER: _ClassVar[int]
    source_topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    reason: str
    consumer_group: str
    failed_at: _timestamp_pb2.Timestamp
    def __init__(self, source_topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ..., key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., reason: _Optional[str] = ..., consumer_group: _Optional[str] = ..., failed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
