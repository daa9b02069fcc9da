"""Protobuf messages generated from the .proto subsets beside this file.

Regenerate with ``python -m compatfs.proto.generate`` after editing a
``.proto``; a test checks the generated modules are up to date.
"""
