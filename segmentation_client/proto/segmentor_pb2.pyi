from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RGBA_PNG: _ClassVar[OutputFormat]
    MATTE_PNG: _ClassVar[OutputFormat]
    RAW_ALPHA: _ClassVar[OutputFormat]

class ImageType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PNG: _ClassVar[ImageType]
    WEBP: _ClassVar[ImageType]
    JPEG: _ClassVar[ImageType]

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_REMOVE_BACKGROUND: _ClassVar[Task]
    TASK_SEGMENT: _ClassVar[Task]
RGBA_PNG: OutputFormat
MATTE_PNG: OutputFormat
RAW_ALPHA: OutputFormat
PNG: ImageType
WEBP: ImageType
JPEG: ImageType
TASK_REMOVE_BACKGROUND: Task
TASK_SEGMENT: Task

class CutoutOptions(_message.Message):
    __slots__ = ("refine", "background", "crop", "crop_margin", "format", "quality", "lossless")
    REFINE_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    CROP_MARGIN_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    LOSSLESS_FIELD_NUMBER: _ClassVar[int]
    refine: bool
    background: str
    crop: bool
    crop_margin: str
    format: ImageType
    quality: int
    lossless: bool
    def __init__(self, refine: _Optional[bool] = ..., background: _Optional[str] = ..., crop: _Optional[bool] = ..., crop_margin: _Optional[str] = ..., format: _Optional[_Union[ImageType, str]] = ..., quality: _Optional[int] = ..., lossless: _Optional[bool] = ...) -> None: ...

class DetectOptions(_message.Message):
    __slots__ = ("conf", "iou", "classes", "max_det")
    CONF_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MAX_DET_FIELD_NUMBER: _ClassVar[int]
    conf: float
    iou: float
    classes: _containers.RepeatedScalarFieldContainer[int]
    max_det: int
    def __init__(self, conf: _Optional[float] = ..., iou: _Optional[float] = ..., classes: _Optional[_Iterable[int]] = ..., max_det: _Optional[int] = ...) -> None: ...

class ImageRequest(_message.Message):
    __slots__ = ("image", "output", "cutout")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CUTOUT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    output: OutputFormat
    cutout: CutoutOptions
    def __init__(self, image: _Optional[bytes] = ..., output: _Optional[_Union[OutputFormat, str]] = ..., cutout: _Optional[_Union[CutoutOptions, _Mapping]] = ...) -> None: ...

class ImageReply(_message.Message):
    __slots__ = ("format", "data", "width", "height", "media_type", "cutout_box")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    CUTOUT_BOX_FIELD_NUMBER: _ClassVar[int]
    format: OutputFormat
    data: bytes
    width: int
    height: int
    media_type: str
    cutout_box: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, format: _Optional[_Union[OutputFormat, str]] = ..., data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., media_type: _Optional[str] = ..., cutout_box: _Optional[_Iterable[int]] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("image", "options")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    options: DetectOptions
    def __init__(self, image: _Optional[bytes] = ..., options: _Optional[_Union[DetectOptions, _Mapping]] = ...) -> None: ...

class Rle(_message.Message):
    __slots__ = ("size", "counts")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    size: _containers.RepeatedScalarFieldContainer[int]
    counts: str
    def __init__(self, size: _Optional[_Iterable[int]] = ..., counts: _Optional[str] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("box", "score", "class_id", "class_name", "mask")
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    box: _containers.RepeatedScalarFieldContainer[float]
    score: float
    class_id: int
    class_name: str
    mask: Rle
    def __init__(self, box: _Optional[_Iterable[float]] = ..., score: _Optional[float] = ..., class_id: _Optional[int] = ..., class_name: _Optional[str] = ..., mask: _Optional[_Union[Rle, _Mapping]] = ...) -> None: ...

class SegmentReply(_message.Message):
    __slots__ = ("width", "height", "model", "instances")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    model: str
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., model: _Optional[str] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ...) -> None: ...

class FramesRequest(_message.Message):
    __slots__ = ("frames", "task", "output", "options", "cutout")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CUTOUT_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedScalarFieldContainer[bytes]
    task: Task
    output: OutputFormat
    options: DetectOptions
    cutout: CutoutOptions
    def __init__(self, frames: _Optional[_Iterable[bytes]] = ..., task: _Optional[_Union[Task, str]] = ..., output: _Optional[_Union[OutputFormat, str]] = ..., options: _Optional[_Union[DetectOptions, _Mapping]] = ..., cutout: _Optional[_Union[CutoutOptions, _Mapping]] = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("status", "code", "message")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: str
    code: str
    message: str
    def __init__(self, status: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class FrameReply(_message.Message):
    __slots__ = ("index", "matte", "segmentation", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MATTE_FIELD_NUMBER: _ClassVar[int]
    SEGMENTATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    matte: ImageReply
    segmentation: SegmentReply
    error: FrameError
    def __init__(self, index: _Optional[int] = ..., matte: _Optional[_Union[ImageReply, _Mapping]] = ..., segmentation: _Optional[_Union[SegmentReply, _Mapping]] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ...) -> None: ...

class FramesReply(_message.Message):
    __slots__ = ("task", "count", "failed", "frames")
    TASK_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    task: Task
    count: int
    failed: int
    frames: _containers.RepeatedCompositeFieldContainer[FrameReply]
    def __init__(self, task: _Optional[_Union[Task, str]] = ..., count: _Optional[int] = ..., failed: _Optional[int] = ..., frames: _Optional[_Iterable[_Union[FrameReply, _Mapping]]] = ...) -> None: ...
