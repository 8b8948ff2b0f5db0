"""rtnetlink (rtnetlink(7)): the host's addresses now, and a monitor of link and address changes.

udev announces interfaces that appear and disappear; a link going up or down and an address added or removed
(DHCP, SLAAC, an LTE modem's new lease) are rtnetlink events only. Both are read on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator

log = logging.getLogger("gatewayd.netlink")

NETLINK_ROUTE = 0
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFF_UP, IFF_RUNNING, IFF_LOWER_UP = 0x1, 0x40, 0x10000
_HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTA = struct.Struct("=HH")


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _HDR.unpack_from(data, offset)
        if length < _HDR.size:
            return
        yield kind, data[offset + _HDR.size : offset + length]
        offset += (length + 3) & ~3


def _attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _RTA.size <= len(data):
        length, kind = _RTA.unpack_from(data, offset)
        if length < _RTA.size:
            return
        yield kind, data[offset + _RTA.size : offset + length]
        offset += (length + 3) & ~3


def _address(body: bytes) -> tuple[int, str] | None:
    """(interface index, address) of an RTM_NEWADDR/RTM_DELADDR body."""
    if len(body) < _IFADDR.size:
        return None
    family, _prefix, _flags, _scope, index = _IFADDR.unpack_from(body)
    attrs = dict(_attributes(body[_IFADDR.size :]))
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)  # IFA_LOCAL is the own address on point-to-point
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return index, socket.inet_ntop(family, raw)


def _dump(kind: int, family: int) -> list[tuple[int, bytes]]:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        body = struct.pack("=B3x", family) if kind == RTM_GETADDR else _IFINFO.pack(family, 0, 0, 0, 0)
        sock.send(_HDR.pack(_HDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        out: list[tuple[int, bytes]] = []
        while True:
            for msg_kind, msg in _messages(sock.recv(65536)):
                if msg_kind == NLMSG_DONE:
                    return out
                if msg_kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", msg)
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    continue
                out.append((msg_kind, msg))


def addresses() -> list[str]:
    """Every IPv4 and IPv6 address configured on the host (its network namespace) now."""
    found: set[str] = set()
    for kind, body in _dump(RTM_GETADDR, socket.AF_UNSPEC):
        entry = _address(body) if kind == RTM_NEWADDR else None
        if entry is not None:
            found.add(entry[1])
    return sorted(found, key=lambda a: (":" in a, a))


def certificate_addresses(found: list[str]) -> list[str]:
    """The addresses a server certificate can name: IPv6 link-local ones need a zone, which no SAN has."""
    return [a for a in found if not (":" in a and ipaddress.ip_address(a).is_link_local)]


def _links() -> dict[int, int]:
    out: dict[int, int] = {}
    for kind, body in _dump(RTM_GETLINK, socket.AF_UNSPEC):
        if kind == RTM_NEWLINK and len(body) >= _IFINFO.size:
            _family, _type, index, flags, _change = _IFINFO.unpack_from(body)
            out[index] = flags
    return out


LINK_FLAGS = IFF_UP | IFF_RUNNING | IFF_LOWER_UP


class RouteMonitor:
    """Calls `handler(what)` on the event loop for each change that matters to a connection: "link" (an
    interface came, went, or its up/running/carrier state changed), "address" (added or removed), or
    "overflow" (the kernel dropped events: anything may have changed)."""

    def __init__(self, handler: Callable[[str], None]) -> None:
        self.handler = handler
        self._sock: socket.socket | None = None
        self._flags: dict[int, int] = {}

    def start(self) -> None:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        try:
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            self._flags = {i: f & LINK_FLAGS for i, f in _links().items()}
        except OSError:
            sock.close()
            raise
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        seen: set[str] = set()
        for _ in range(64):
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    seen.add("overflow")
                    continue
                log.warning("rtnetlink monitor: %s", exc)
                break
            for kind, body in _messages(data):
                what = self._classify(kind, body)
                if what:
                    seen.add(what)
        for what in sorted(seen):
            try:
                self.handler(what)
            except Exception:
                log.exception("handling the network change (%s) failed", what)

    def _classify(self, kind: int, body: bytes) -> str | None:
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            return "address" if _address(body) is not None else None
        if kind in (RTM_NEWLINK, RTM_DELLINK) and len(body) >= _IFINFO.size:
            _family, _type, index, flags, _change = _IFINFO.unpack_from(body)
            before = self._flags.get(index)
            if kind == RTM_DELLINK:
                self._flags.pop(index, None)
                return "link"
            self._flags[index] = flags & LINK_FLAGS
            return "link" if before != flags & LINK_FLAGS else None  # statistics and the like: not a change
        return None

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
