from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuthBody(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class AuthContainer(_message.Message):
    __slots__ = ("protectedPayload",)
    PROTECTEDPAYLOAD_FIELD_NUMBER: _ClassVar[int]
    protectedPayload: AuthBody
    def __init__(self, protectedPayload: _Optional[_Union[AuthBody, _Mapping]] = ...) -> None: ...
