"""IP addresses as one spelling, to tell whether two endpoints name the same server."""

from __future__ import annotations

import ipaddress

LOOPBACK = frozenset({"127.0.0.1", "::1"})


def normalise(address: str) -> str | None:
    """An IP address as one spelling (an IPv4-mapped IPv6 address as IPv4); None for a name or nothing."""
    if address == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return ip.compressed


def addresses_of(*candidates: str | None) -> frozenset[str]:
    """The IP addresses among ``candidates``, normalised; ``localhost`` stands for both loopbacks."""
    found = {normalise(c) for c in candidates if c}
    if "127.0.0.1" in found and "localhost" in candidates:
        found.add("::1")
    return frozenset(a for a in found if a is not None)
