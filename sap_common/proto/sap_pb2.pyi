from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Output(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_LOGITS: _ClassVar[Output]
    OUTPUT_POOLED: _ClassVar[Output]
    OUTPUT_HIDDEN: _ClassVar[Output]
OUTPUT_LOGITS: Output
OUTPUT_POOLED: Output
OUTPUT_HIDDEN: Output

class TensorHeader(_message.Message):
    __slots__ = ("dtype", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("protocol_version", "model_id", "family", "model_type", "split", "total_blocks", "hidden_size", "peft", "bottom_sha256", "max_message_bytes", "chunk_bytes", "start_adapters")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    PEFT_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_SHA256_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    START_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    model_id: str
    family: str
    model_type: str
    split: int
    total_blocks: int
    hidden_size: int
    peft: str
    bottom_sha256: str
    max_message_bytes: int
    chunk_bytes: int
    start_adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, protocol_version: _Optional[int] = ..., model_id: _Optional[str] = ..., family: _Optional[str] = ..., model_type: _Optional[str] = ..., split: _Optional[int] = ..., total_blocks: _Optional[int] = ..., hidden_size: _Optional[int] = ..., peft: _Optional[str] = ..., bottom_sha256: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., start_adapters: _Optional[_Iterable[str]] = ...) -> None: ...

class DownloadBottomRequest(_message.Message):
    __slots__ = ("tail_blocks", "lm_head")
    TAIL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LM_HEAD_FIELD_NUMBER: _ClassVar[int]
    tail_blocks: int
    lm_head: bool
    def __init__(self, tail_blocks: _Optional[int] = ..., lm_head: _Optional[bool] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("path", "offset", "total_size", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    total_size: int
    data: bytes
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("num_labels", "learning_rate", "seed", "train_bottom", "weight_decay", "adapter_id", "output", "user_tail", "start_adapter")
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_BOTTOM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    USER_TAIL_FIELD_NUMBER: _ClassVar[int]
    START_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    num_labels: int
    learning_rate: float
    seed: int
    train_bottom: bool
    weight_decay: float
    adapter_id: str
    output: Output
    user_tail: int
    start_adapter: str
    def __init__(self, num_labels: _Optional[int] = ..., learning_rate: _Optional[float] = ..., seed: _Optional[int] = ..., train_bottom: _Optional[bool] = ..., weight_decay: _Optional[float] = ..., adapter_id: _Optional[str] = ..., output: _Optional[_Union[Output, str]] = ..., user_tail: _Optional[int] = ..., start_adapter: _Optional[str] = ...) -> None: ...

class OpenSessionReply(_message.Message):
    __slots__ = ("session_id", "trainable_parameters", "num_labels", "steps_applied", "session_secret")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    STEPS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    trainable_parameters: int
    num_labels: int
    steps_applied: int
    session_secret: str
    def __init__(self, session_id: _Optional[str] = ..., trainable_parameters: _Optional[int] = ..., num_labels: _Optional[int] = ..., steps_applied: _Optional[int] = ..., session_secret: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id", "keep")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    keep: bool
    def __init__(self, session_id: _Optional[str] = ..., keep: _Optional[bool] = ...) -> None: ...

class CloseSessionReply(_message.Message):
    __slots__ = ("steps_applied", "adapter_id")
    STEPS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    steps_applied: int
    adapter_id: str
    def __init__(self, steps_applied: _Optional[int] = ..., adapter_id: _Optional[str] = ...) -> None: ...

class ForwardHeader(_message.Message):
    __slots__ = ("session_id", "step", "hidden", "lengths", "output")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    hidden: TensorHeader
    lengths: _containers.RepeatedScalarFieldContainer[int]
    output: Output
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., hidden: _Optional[_Union[TensorHeader, _Mapping]] = ..., lengths: _Optional[_Iterable[int]] = ..., output: _Optional[_Union[Output, str]] = ...) -> None: ...

class ForwardFrame(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ForwardHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ForwardHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ForwardReplyHeader(_message.Message):
    __slots__ = ("step", "output", "tensor")
    STEP_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    step: int
    output: Output
    tensor: TensorHeader
    def __init__(self, step: _Optional[int] = ..., output: _Optional[_Union[Output, str]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ...) -> None: ...

class ForwardReplyFrame(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ForwardReplyHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ForwardReplyHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ForwardFrames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[ForwardFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[ForwardFrame, _Mapping]]] = ...) -> None: ...

class ForwardReplyFrames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[ForwardReplyFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[ForwardReplyFrame, _Mapping]]] = ...) -> None: ...

class BackwardHeader(_message.Message):
    __slots__ = ("session_id", "step", "grad")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    grad: TensorHeader
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., grad: _Optional[_Union[TensorHeader, _Mapping]] = ...) -> None: ...

class BackwardFrame(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: BackwardHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[BackwardHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class BackwardReplyHeader(_message.Message):
    __slots__ = ("applied_step", "replayed", "checkpointed", "grad_hidden")
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTED_FIELD_NUMBER: _ClassVar[int]
    GRAD_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    applied_step: int
    replayed: bool
    checkpointed: bool
    grad_hidden: TensorHeader
    def __init__(self, applied_step: _Optional[int] = ..., replayed: _Optional[bool] = ..., checkpointed: _Optional[bool] = ..., grad_hidden: _Optional[_Union[TensorHeader, _Mapping]] = ...) -> None: ...

class BackwardReplyFrame(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: BackwardReplyHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[BackwardReplyHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ResumeSessionRequest(_message.Message):
    __slots__ = ("session_id", "step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class ResumeSessionReply(_message.Message):
    __slots__ = ("steps_applied", "num_labels")
    STEPS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    steps_applied: int
    num_labels: int
    def __init__(self, steps_applied: _Optional[int] = ..., num_labels: _Optional[int] = ...) -> None: ...

class GenerateHeader(_message.Message):
    __slots__ = ("session_id", "hidden")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    hidden: TensorHeader
    def __init__(self, session_id: _Optional[str] = ..., hidden: _Optional[_Union[TensorHeader, _Mapping]] = ...) -> None: ...

class GenerateFrame(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: GenerateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[GenerateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GenerateReplyHeader(_message.Message):
    __slots__ = ("position", "tensor")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    position: int
    tensor: TensorHeader
    def __init__(self, position: _Optional[int] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ...) -> None: ...

class GenerateReplyFrame(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: GenerateReplyHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[GenerateReplyHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
