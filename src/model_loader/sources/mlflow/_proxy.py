"""HTTP(S) proxies from ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY``, as
``requests`` (and so MLflow's own client) reads them.

Read once, when the source is built, from the mapping it is given (``os.environ`` by
default); lower-case names win over upper-case ones, as in :mod:`urllib.request`. A
plain ``http://`` request goes to the proxy with an absolute target; an ``https://`` one
opens a ``CONNECT`` tunnel through it and then does TLS with the real host end to end.

``NO_PROXY``: comma-separated entries; ``*`` bypasses every host; an entry matches a host
that equals it or ends with ``.<entry>`` (a leading dot is optional), an entry with a port
only that port, and an IPv4 entry may be a CIDR range (``10.0.0.0/8``).

Only ``http://`` proxy URLs are supported (a scheme-less ``proxy:3128`` means
``http://``): the tunnel still encrypts ``https`` end to end. A request that would go
through a SOCKS or ``https://`` proxy is refused (:class:`ProxyConfigError`, naming the
variable) rather than sent around it.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from model_loader.sources.mlflow._errors import ProxyConfigError

__all__ = ["Proxy", "ProxyConfigError", "ProxySettings"]


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy: where to connect, and the ``Proxy-Authorization`` header if any."""

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)

    def __str__(self) -> str:  # safe to log: no credentials
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _parse_proxy(name: str, value: str) -> Proxy:
    text = value.strip()
    if "://" not in text:
        text = "http://" + text  # requests' prepend_scheme_if_needed
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    shown = f"{scheme}://{parts.netloc.rpartition('@')[2]}"
    if scheme != "http":
        raise ProxyConfigError(
            f"{name}={shown}: only http:// proxies are supported (an https:// target still goes through a "
            "CONNECT tunnel, encrypted end to end); unset it or point it at an http:// proxy"
        )
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ProxyConfigError(f"{name}={shown}: {exc}") from None
    if not parts.hostname:
        raise ProxyConfigError(f"{name}={shown}: no proxy host")
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    return Proxy(parts.hostname, port, authorization)


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        value = env.get(name)
        if value and value.strip():
            return name, value
    return None


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Which proxy, if any, each ``(scheme, host, port)`` goes through."""

    http: Proxy | ProxyConfigError | None = None
    https: Proxy | ProxyConfigError | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProxySettings:
        """Read the proxy variables (lower case first); an unusable one is kept as its error."""
        every = _first(env, "all_proxy", "ALL_PROXY")
        proxies: dict[str, Proxy | ProxyConfigError | None] = {}
        for scheme in ("http", "https"):
            found = _first(env, f"{scheme}_proxy", f"{scheme.upper()}_PROXY") or every
            try:
                proxies[scheme] = _parse_proxy(*found) if found else None
            except ProxyConfigError as exc:
                proxies[scheme] = exc
        bypass = _first(env, "no_proxy", "NO_PROXY")
        entries = tuple(e.strip().lower() for e in bypass[1].split(",") if e.strip()) if bypass else ()
        return cls(proxies["http"], proxies["https"], entries)

    def __bool__(self) -> bool:
        return self.http is not None or self.https is not None

    def for_target(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy for a request to ``scheme://host:port``, or ``None`` to connect directly.

        Raises:
            ProxyConfigError: The request would go through a proxy this client cannot use.
        """
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self.bypassed(host, port):
            return None
        if isinstance(proxy, ProxyConfigError):
            raise ProxyConfigError(str(proxy))
        return proxy

    def bypassed(self, host: str, port: int) -> bool:
        """True when ``NO_PROXY`` names ``host`` (and ``port``, if the entry has one)."""
        host = host.strip("[]").lower().rstrip(".")
        for entry in self.no_proxy:
            if entry == "*":
                return True
            entry_host, entry_port = _split_entry(entry)
            if entry_port is not None and entry_port != port:
                continue
            if _host_matches(host, entry_host):
                return True
        return False


def _split_entry(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [::1]:8080
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


def _host_matches(host: str, entry: str) -> bool:
    entry = entry.lstrip(".").rstrip(".")
    if not entry:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == entry or host.endswith("." + entry)
    try:
        return address in ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
