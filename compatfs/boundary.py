"""The errno boundary: the one place a FUSE request's failure becomes an errno.

pyfuse3 answers a request with the errno of a :class:`pyfuse3.FUSEError` its
handler raises; any other exception escapes into pyfuse3's main loop and ends
the mount. So every request handler of :class:`compatfs.operations.Operations`
(and of its inspection subclass) is wrapped here, and this module decides,
once for all of them, what each failure answers:

- ``FUSEError``: its errno, as the handler chose;
- ``OSError`` (from a backing store): its errno (``EIO`` if it has none),
  logged at debug level;
- :class:`compatfs.inodes.UnknownInode`: ``ENOENT`` (logged at debug level).
  The kernel named an inode the table does not hold (one it was told to
  forget, or never given): the object is gone for this mount, as a removed
  name is, and an agent expects ``ENOENT`` for that, not ``ESTALE``;
- :class:`BadHandle`: ``EBADF`` (logged at debug level), a file or directory
  handle that was never opened or is already released;
- anything else, a ``KeyError`` included, is a fault: logged with its
  traceback, counted in ``faults``, answered ``EIO``; the mount keeps serving.

A request the kernel expects no reply to (``forget``) cannot be answered an
errno and must not raise at all: :func:`no_reply_boundary` logs and counts
every failure as a fault and returns.

Both wrappers set :data:`BOUNDARY_MARK` on the handler they return, so a test
can prove that every handler is inside (:func:`is_bounded`). The boundary
costs a request two clock reads (its latency, :mod:`compatfs.latency`) and a
``try``; nothing else on the way in or out.
"""

from __future__ import annotations

import errno
import functools
import logging
import reprlib
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import Any, Protocol, TypeVar

from pyfuse3 import FUSEError

from .inodes import UnknownInode
from .latency import LatencyHistogram

#: The attribute a wrapped handler carries (``True``).
BOUNDARY_MARK = "inside_errno_boundary"

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


class BadHandle(Exception):
    """A request named a file or directory handle that is not open."""

    def __init__(self, fh: int) -> None:
        super().__init__(f"no open handle {fh}")
        self.fh = fh


class Bounded(Protocol):
    """What the boundary counts on the operations object it guards."""

    faults: int                  # unexpected errors answered with EIO (or, forget, dropped)
    latency: LatencyHistogram    # time per request


def is_bounded(handler: object) -> bool:
    """Whether *handler* was wrapped by :func:`errno_boundary` or :func:`no_reply_boundary`."""
    return getattr(handler, BOUNDARY_MARK, False) is True


def errno_boundary(handler: Handler) -> Handler:
    """Wrap a request *handler* so that only ``FUSEError`` leaves it (see the module doc)."""
    name = handler.__name__
    log = logging.getLogger(handler.__module__)   # faults are logged where the handler lives

    @functools.wraps(handler)
    async def wrapper(self: Bounded, *args: Any) -> Any:
        start = perf_counter_ns()
        try:
            return await handler(self, *args)
        except FUSEError:
            raise
        except OSError as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s%r: %s", name, args[:2], exc)
            raise FUSEError(exc.errno or errno.EIO) from None
        except UnknownInode as exc:
            log.debug("%s%r: %s; answered ENOENT", name, args[:2], exc)
            raise FUSEError(errno.ENOENT) from None
        except BadHandle as exc:
            log.debug("%s%r: %s; answered EBADF", name, args[:2], exc)
            raise FUSEError(errno.EBADF) from None
        except Exception:
            self.faults += 1
            log.exception("unexpected error in %s%r; answered EIO", name, args[:2])
            raise FUSEError(errno.EIO) from None
        finally:
            self.latency.add(perf_counter_ns() - start)

    setattr(wrapper, BOUNDARY_MARK, True)
    return wrapper  # type: ignore[return-value]


def no_reply_boundary(handler: Handler) -> Handler:
    """Wrap a *handler* the kernel expects no reply from: it never raises."""
    name = handler.__name__
    log = logging.getLogger(handler.__module__)

    @functools.wraps(handler)
    async def wrapper(self: Bounded, *args: Any) -> None:
        try:
            await handler(self, *args)
        except Exception:
            self.faults += 1
            log.exception("unexpected error in %s%s; nothing to answer, carried on",
                          name, reprlib.repr(args))   # a forget may name thousands of inodes

    setattr(wrapper, BOUNDARY_MARK, True)
    return wrapper  # type: ignore[return-value]
