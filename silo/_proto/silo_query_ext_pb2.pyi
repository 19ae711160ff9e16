from . import silo_pb2 as _silo_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QueryAllRequest(_message.Message):
    __slots__ = ("sql", "parameters")
    SQL_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    sql: str
    parameters: _containers.RepeatedCompositeFieldContainer[_silo_pb2.QueryParameter]
    def __init__(self, sql: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[_silo_pb2.QueryParameter, _Mapping]]] = ...) -> None: ...

class QueryAllResponse(_message.Message):
    __slots__ = ("columns", "rows", "row_count", "shard_count")
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    columns: _containers.RepeatedCompositeFieldContainer[_silo_pb2.ColumnInfo]
    rows: _containers.RepeatedCompositeFieldContainer[_silo_pb2.SerializedBytes]
    row_count: int
    shard_count: int
    def __init__(self, columns: _Optional[_Iterable[_Union[_silo_pb2.ColumnInfo, _Mapping]]] = ..., rows: _Optional[_Iterable[_Union[_silo_pb2.SerializedBytes, _Mapping]]] = ..., row_count: _Optional[int] = ..., shard_count: _Optional[int] = ...) -> None: ...

class ArrowBatches(_message.Message):
    __slots__ = ("ipc_data",)
    IPC_DATA_FIELD_NUMBER: _ClassVar[int]
    ipc_data: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, ipc_data: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ShardTables(_message.Message):
    __slots__ = ("names", "ipc_data")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    IPC_DATA_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    ipc_data: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, names: _Optional[_Iterable[str]] = ..., ipc_data: _Optional[_Iterable[bytes]] = ...) -> None: ...
