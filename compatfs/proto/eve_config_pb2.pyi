from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FmtUnknown: _ClassVar[Format]
    RAW: _ClassVar[Format]
    QCOW: _ClassVar[Format]
    QCOW2: _ClassVar[Format]
    VHD: _ClassVar[Format]
    VMDK: _ClassVar[Format]
    OVA: _ClassVar[Format]
    VHDX: _ClassVar[Format]
    CONTAINER: _ClassVar[Format]
    ISO: _ClassVar[Format]
    PVC: _ClassVar[Format]

class VolumeContentOriginType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VCOT_UNKNOWN: _ClassVar[VolumeContentOriginType]
    VCOT_BLANK: _ClassVar[VolumeContentOriginType]
    VCOT_DOWNLOAD: _ClassVar[VolumeContentOriginType]
FmtUnknown: Format
RAW: Format
QCOW: Format
QCOW2: Format
VHD: Format
VMDK: Format
OVA: Format
VHDX: Format
CONTAINER: Format
ISO: Format
PVC: Format
VCOT_UNKNOWN: VolumeContentOriginType
VCOT_BLANK: VolumeContentOriginType
VCOT_DOWNLOAD: VolumeContentOriginType

class UUIDandVersion(_message.Message):
    __slots__ = ("uuid", "version")
    UUID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    version: str
    def __init__(self, uuid: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("uuidandversion", "name", "sha256", "iformat")
    UUIDANDVERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    IFORMAT_FIELD_NUMBER: _ClassVar[int]
    uuidandversion: UUIDandVersion
    name: str
    sha256: str
    iformat: Format
    def __init__(self, uuidandversion: _Optional[_Union[UUIDandVersion, _Mapping]] = ..., name: _Optional[str] = ..., sha256: _Optional[str] = ..., iformat: _Optional[_Union[Format, str]] = ...) -> None: ...

class Drive(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: Image
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class InstanceOpsCmd(_message.Message):
    __slots__ = ("counter",)
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    counter: int
    def __init__(self, counter: _Optional[int] = ...) -> None: ...

class VolumeRef(_message.Message):
    __slots__ = ("uuid", "generationCount")
    UUID_FIELD_NUMBER: _ClassVar[int]
    GENERATIONCOUNT_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    generationCount: int
    def __init__(self, uuid: _Optional[str] = ..., generationCount: _Optional[int] = ...) -> None: ...

class AppInstanceConfig(_message.Message):
    __slots__ = ("uuidandversion", "displayname", "drives", "purge", "volumeRefList")
    UUIDANDVERSION_FIELD_NUMBER: _ClassVar[int]
    DISPLAYNAME_FIELD_NUMBER: _ClassVar[int]
    DRIVES_FIELD_NUMBER: _ClassVar[int]
    PURGE_FIELD_NUMBER: _ClassVar[int]
    VOLUMEREFLIST_FIELD_NUMBER: _ClassVar[int]
    uuidandversion: UUIDandVersion
    displayname: str
    drives: _containers.RepeatedCompositeFieldContainer[Drive]
    purge: InstanceOpsCmd
    volumeRefList: _containers.RepeatedCompositeFieldContainer[VolumeRef]
    def __init__(self, uuidandversion: _Optional[_Union[UUIDandVersion, _Mapping]] = ..., displayname: _Optional[str] = ..., drives: _Optional[_Iterable[_Union[Drive, _Mapping]]] = ..., purge: _Optional[_Union[InstanceOpsCmd, _Mapping]] = ..., volumeRefList: _Optional[_Iterable[_Union[VolumeRef, _Mapping]]] = ...) -> None: ...

class VolumeContentOrigin(_message.Message):
    __slots__ = ("type", "downloadContentTreeID")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DOWNLOADCONTENTTREEID_FIELD_NUMBER: _ClassVar[int]
    type: VolumeContentOriginType
    downloadContentTreeID: str
    def __init__(self, type: _Optional[_Union[VolumeContentOriginType, str]] = ..., downloadContentTreeID: _Optional[str] = ...) -> None: ...

class Volume(_message.Message):
    __slots__ = ("uuid", "origin", "generationCount", "displayName", "clear_text")
    UUID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    GENERATIONCOUNT_FIELD_NUMBER: _ClassVar[int]
    DISPLAYNAME_FIELD_NUMBER: _ClassVar[int]
    CLEAR_TEXT_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    origin: VolumeContentOrigin
    generationCount: int
    displayName: str
    clear_text: bool
    def __init__(self, uuid: _Optional[str] = ..., origin: _Optional[_Union[VolumeContentOrigin, _Mapping]] = ..., generationCount: _Optional[int] = ..., displayName: _Optional[str] = ..., clear_text: _Optional[bool] = ...) -> None: ...

class ContentTree(_message.Message):
    __slots__ = ("uuid", "URL", "iformat", "sha256", "displayName", "generation_count")
    UUID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    IFORMAT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DISPLAYNAME_FIELD_NUMBER: _ClassVar[int]
    GENERATION_COUNT_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    URL: str
    iformat: Format
    sha256: str
    displayName: str
    generation_count: int
    def __init__(self, uuid: _Optional[str] = ..., URL: _Optional[str] = ..., iformat: _Optional[_Union[Format, str]] = ..., sha256: _Optional[str] = ..., displayName: _Optional[str] = ..., generation_count: _Optional[int] = ...) -> None: ...

class EdgeDevConfig(_message.Message):
    __slots__ = ("apps", "contentInfo", "volumes")
    APPS_FIELD_NUMBER: _ClassVar[int]
    CONTENTINFO_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    apps: _containers.RepeatedCompositeFieldContainer[AppInstanceConfig]
    contentInfo: _containers.RepeatedCompositeFieldContainer[ContentTree]
    volumes: _containers.RepeatedCompositeFieldContainer[Volume]
    def __init__(self, apps: _Optional[_Iterable[_Union[AppInstanceConfig, _Mapping]]] = ..., contentInfo: _Optional[_Iterable[_Union[ContentTree, _Mapping]]] = ..., volumes: _Optional[_Iterable[_Union[Volume, _Mapping]]] = ...) -> None: ...

class ConfigResponse(_message.Message):
    __slots__ = ("config", "configHash")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CONFIGHASH_FIELD_NUMBER: _ClassVar[int]
    config: EdgeDevConfig
    configHash: str
    def __init__(self, config: _Optional[_Union[EdgeDevConfig, _Mapping]] = ..., configHash: _Optional[str] = ...) -> None: ...
