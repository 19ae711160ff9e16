from . import silo_pb2 as _silo_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnqueueManyRequest(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_silo_pb2.EnqueueRequest]
    def __init__(self, jobs: _Optional[_Iterable[_Union[_silo_pb2.EnqueueRequest, _Mapping]]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EnqueueResult(_message.Message):
    __slots__ = ("id", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    error: Status
    def __init__(self, id: _Optional[str] = ..., error: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class EnqueueManyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EnqueueResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EnqueueResult, _Mapping]]] = ...) -> None: ...

class Subscribe(_message.Message):
    __slots__ = ("worker_id", "task_group", "slots", "shard")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_GROUP_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    task_group: str
    slots: int
    shard: str
    def __init__(self, worker_id: _Optional[str] = ..., task_group: _Optional[str] = ..., slots: _Optional[int] = ..., shard: _Optional[str] = ...) -> None: ...

class TaskRef(_message.Message):
    __slots__ = ("shard", "task_id", "tenant_id")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    shard: str
    task_id: str
    tenant_id: str
    def __init__(self, shard: _Optional[str] = ..., task_id: _Optional[str] = ..., tenant_id: _Optional[str] = ...) -> None: ...

class WorkerUp(_message.Message):
    __slots__ = ("subscribe", "add_slots", "outcomes", "heartbeats", "refresh_outcomes", "give_back", "stop")
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    ADD_SLOTS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    REFRESH_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    GIVE_BACK_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    subscribe: Subscribe
    add_slots: int
    outcomes: _containers.RepeatedCompositeFieldContainer[_silo_pb2.ReportOutcomeRequest]
    heartbeats: _containers.RepeatedCompositeFieldContainer[_silo_pb2.HeartbeatRequest]
    refresh_outcomes: _containers.RepeatedCompositeFieldContainer[_silo_pb2.ReportRefreshOutcomeRequest]
    give_back: _containers.RepeatedCompositeFieldContainer[TaskRef]
    stop: bool
    def __init__(self, subscribe: _Optional[_Union[Subscribe, _Mapping]] = ..., add_slots: _Optional[int] = ..., outcomes: _Optional[_Iterable[_Union[_silo_pb2.ReportOutcomeRequest, _Mapping]]] = ..., heartbeats: _Optional[_Iterable[_Union[_silo_pb2.HeartbeatRequest, _Mapping]]] = ..., refresh_outcomes: _Optional[_Iterable[_Union[_silo_pb2.ReportRefreshOutcomeRequest, _Mapping]]] = ..., give_back: _Optional[_Iterable[_Union[TaskRef, _Mapping]]] = ..., stop: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("kind", "task_id", "error", "cancelled", "cancelled_at_ms")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME: _ClassVar[Ack.Kind]
        HEARTBEAT: _ClassVar[Ack.Kind]
        REFRESH_OUTCOME: _ClassVar[Ack.Kind]
        GIVE_BACK: _ClassVar[Ack.Kind]
    OUTCOME: Ack.Kind
    HEARTBEAT: Ack.Kind
    REFRESH_OUTCOME: Ack.Kind
    GIVE_BACK: Ack.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    kind: Ack.Kind
    task_id: str
    error: Status
    cancelled: bool
    cancelled_at_ms: int
    def __init__(self, kind: _Optional[_Union[Ack.Kind, str]] = ..., task_id: _Optional[str] = ..., error: _Optional[_Union[Status, _Mapping]] = ..., cancelled: _Optional[bool] = ..., cancelled_at_ms: _Optional[int] = ...) -> None: ...

class WorkerDown(_message.Message):
    __slots__ = ("tasks", "refresh_tasks", "acks", "cancelled", "stopped")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    REFRESH_TASKS_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[_silo_pb2.Task]
    refresh_tasks: _containers.RepeatedCompositeFieldContainer[_silo_pb2.RefreshFloatingLimitTask]
    acks: _containers.RepeatedCompositeFieldContainer[Ack]
    cancelled: _containers.RepeatedCompositeFieldContainer[TaskRef]
    stopped: bool
    def __init__(self, tasks: _Optional[_Iterable[_Union[_silo_pb2.Task, _Mapping]]] = ..., refresh_tasks: _Optional[_Iterable[_Union[_silo_pb2.RefreshFloatingLimitTask, _Mapping]]] = ..., acks: _Optional[_Iterable[_Union[Ack, _Mapping]]] = ..., cancelled: _Optional[_Iterable[_Union[TaskRef, _Mapping]]] = ..., stopped: _Optional[bool] = ...) -> None: ...
