from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_KIND_UNSPECIFIED: _ClassVar[ErrorKind]
    HANDLER_RAISED: _ClassVar[ErrorKind]
    WRONG_RESULT: _ClassVar[ErrorKind]
    RUNTIME_FAILED: _ClassVar[ErrorKind]
    INVALID_INPUT: _ClassVar[ErrorKind]
    NOT_SERIALIZABLE: _ClassVar[ErrorKind]
ERROR_KIND_UNSPECIFIED: ErrorKind
HANDLER_RAISED: ErrorKind
WRONG_RESULT: ErrorKind
RUNTIME_FAILED: ErrorKind
INVALID_INPUT: ErrorKind
NOT_SERIALIZABLE: ErrorKind

class SupervisorMessage(_message.Message):
    __slots__ = ("batch", "ping", "shutdown")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    batch: Batch
    ping: Ping
    shutdown: Shutdown
    def __init__(self, batch: _Optional[_Union[Batch, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "ready", "load_failed", "result", "pong", "log")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    LOAD_FAILED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    ready: Ready
    load_failed: LoadFailed
    result: BatchResult
    pong: Pong
    log: LogRecord
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., ready: _Optional[_Union[Ready, _Mapping]] = ..., load_failed: _Optional[_Union[LoadFailed, _Mapping]] = ..., result: _Optional[_Union[BatchResult, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., log: _Optional[_Union[LogRecord, _Mapping]] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("id", "items", "tensor_items", "isolate")
    ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_ITEMS_FIELD_NUMBER: _ClassVar[int]
    ISOLATE_FIELD_NUMBER: _ClassVar[int]
    id: int
    items: _containers.RepeatedScalarFieldContainer[bytes]
    tensor_items: _containers.RepeatedCompositeFieldContainer[TensorItem]
    isolate: bool
    def __init__(self, id: _Optional[int] = ..., items: _Optional[_Iterable[bytes]] = ..., tensor_items: _Optional[_Iterable[_Union[TensorItem, _Mapping]]] = ..., isolate: bool = ...) -> None: ...

class TensorItem(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "datatype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("id", "outputs", "item_errors", "batch_error", "compute_seconds", "tensor_outputs", "isolation_calls", "fail_fast")
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ITEM_ERRORS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ERROR_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_CALLS_FIELD_NUMBER: _ClassVar[int]
    FAIL_FAST_FIELD_NUMBER: _ClassVar[int]
    id: int
    outputs: bytes
    item_errors: _containers.RepeatedCompositeFieldContainer[ItemError]
    batch_error: Error
    compute_seconds: float
    tensor_outputs: _containers.RepeatedCompositeFieldContainer[TensorItem]
    isolation_calls: int
    fail_fast: bool
    def __init__(self, id: _Optional[int] = ..., outputs: _Optional[bytes] = ..., item_errors: _Optional[_Iterable[_Union[ItemError, _Mapping]]] = ..., batch_error: _Optional[_Union[Error, _Mapping]] = ..., compute_seconds: _Optional[float] = ..., tensor_outputs: _Optional[_Iterable[_Union[TensorItem, _Mapping]]] = ..., isolation_calls: _Optional[int] = ..., fail_fast: bool = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("type", "message", "traceback", "kind")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    type: str
    message: str
    traceback: str
    kind: ErrorKind
    def __init__(self, type: _Optional[str] = ..., message: _Optional[str] = ..., traceback: _Optional[str] = ..., kind: _Optional[_Union[ErrorKind, str]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("index", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    error: Error
    def __init__(self, index: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "pid", "python_version", "runtime_version", "worker_index")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_INDEX_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    pid: int
    python_version: str
    runtime_version: str
    worker_index: int
    def __init__(self, protocol_version: _Optional[int] = ..., pid: _Optional[int] = ..., python_version: _Optional[str] = ..., runtime_version: _Optional[str] = ..., worker_index: _Optional[int] = ...) -> None: ...

class Ready(_message.Message):
    __slots__ = ("load_seconds",)
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    load_seconds: float
    def __init__(self, load_seconds: _Optional[float] = ...) -> None: ...

class LoadFailed(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: Error
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LogRecord(_message.Message):
    __slots__ = ("level", "logger", "message")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    LOGGER_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    level: int
    logger: str
    message: str
    def __init__(self, level: _Optional[int] = ..., logger: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
