from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainerStatus(_message.Message):
    __slots__ = ("stage", "step", "policy_version", "kl", "mean_reward", "pending_prompts", "feedback_consumed", "reward_version", "metrics")
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
    stage: str
    step: int
    policy_version: int
    kl: float
    mean_reward: float
    pending_prompts: int
    feedback_consumed: int
    reward_version: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, stage: _Optional[str] = ..., step: _Optional[int] = ..., policy_version: _Optional[int] = ..., kl: _Optional[float] = ..., mean_reward: _Optional[float] = ..., pending_prompts: _Optional[int] = ..., feedback_consumed: _Optional[int] = ..., reward_version: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...
