"""The gateway's door decisions (pure): which paths may reach an engine, who may make the daemon
start or swap an engine, whether a request runs now, waits in line or is refused, and when an idle
engine is unloaded.

The gateway is the one port every agent talks to, in front of a model that took minutes to load.
These rules keep a client from reaching an engine's admin endpoints (Ollama's pull/delete, vLLM's
``/sleep``, SGLang's ``/update_weights_from_disk``), from stopping an engine others use, and from
exhausting the daemon with unbounded concurrency.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote_to_bytes

# The inference API paths the gateway forwards, exactly (``/v1/models`` is answered by the gateway
# itself). Anything else is refused before routing, so an engine's admin endpoints are never reachable
# through the gateway.
OPENAI_API_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
                    "/v1/messages/count_tokens")
# Ollama's own chat and generate (server/routes.go: ChatHandler, GenerateHandler; docs/api.md): newline-
# delimited JSON, streamed unless the request says "stream": false. Forwarded to Ollama engines only.
OLLAMA_API_PATHS = ("/api/chat", "/api/generate")
FORWARDED_PATHS = (*OPENAI_API_PATHS, *OLLAMA_API_PATHS)
MESSAGES_PREFIX = "/v1/messages"
FORWARDED_METHOD = "POST"
# The model list (``/v1/models``, ``/v1/models/{id}``) is the gateway's own answer, to GET (HEAD) only.
MODELS_PATH = "/v1/models"
MODELS_METHOD = "GET"
EMBEDDINGS_PATH = "/v1/embeddings"
# Kinds whose engine has no embeddings endpoint: mlx_lm.server answers only completions and chat
# completions (mlx_lm/server.py, ``request_factories`` in ``do_POST``).
NO_EMBEDDINGS = frozenset({"mlx_lm"})
# The forwarded paths some kinds of engine do not serve (``engine_serves``).
KIND_DEPENDENT_PATHS = frozenset((*OLLAMA_API_PATHS, EMBEDDINGS_PATH))


@dataclass(frozen=True, slots=True)
class PathVerdict:
    ok: bool
    status: int = 200
    code: str = ""
    message: str = ""
    allow: str = ""  # a 405's Allow header: the method the path takes


def models_path(path: str) -> bool:
    """A path of the gateway's own model list: ``/v1/models`` or ``/v1/models/{id}`` (decoded)."""
    return path == MODELS_PATH or path.startswith(MODELS_PATH + "/")


def check_path_safe(raw_path: bytes, *, encoded_slash: bool = False) -> PathVerdict:
    """A request path (as sent, percent-encoded; a query is never part of it) that a proxy or an engine
    could not read as another path, or why not. Any path the gateway is sent is checked so, its own
    pages' too.

    Dot segments (``..``, ``.``) are refused however they are spelled (``%2e%2e``, ``.%2E``, a ``?``
    sent encoded before them does not hide them), as are backslashes, encoded slashes (``%2f``,
    ``%5c``), an encoded percent sign (``%25``: a path encoded twice, which a second decoding would
    turn into dots or slashes) and control characters. ``encoded_slash``: a path the gateway answers
    itself and never forwards, where an encoded slash is part of a name (``/v1/models/Qwen%2FQwen3-8B``,
    as the OpenAI and Anthropic SDKs send a model id with a slash).
    """
    lowered = raw_path.lower()
    if (b"%2f" in lowered and not encoded_slash) or b"%5c" in lowered or b"\\" in raw_path:
        return PathVerdict(False, 400, "invalid_path", "the path contains a backslash or an encoded slash; "
                                                       "send a plain path such as /v1/chat/completions")
    if b"%25" in raw_path:
        return PathVerdict(False, 400, "invalid_path", "the path contains an encoded percent sign (%25: a path "
                                                       "encoded twice); send a plain path such as /v1/chat/completions")
    decoded = unquote_to_bytes(raw_path)
    if any(b < 0x20 or b == 0x7F for b in decoded):
        return PathVerdict(False, 400, "invalid_path", "the path contains control characters; send a plain "
                                                       "path such as /v1/chat/completions")
    if any(segment in (b".", b"..") for segment in decoded.split(b"/")):
        return PathVerdict(False, 400, "invalid_path", "the path contains dot segments ('.' or '..', also "
                                                       "percent-encoded); send a plain path such as /v1/chat/completions")
    return PathVerdict(True)


def check_path(raw_path: bytes, method: str = FORWARDED_METHOD) -> PathVerdict:
    """A request (its path as sent, and its method) that may be forwarded to an engine, or why not: a safe
    path (``check_path_safe``) that is one of ``FORWARDED_PATHS`` exactly, sent with POST. A method a path
    does not take is a 405 naming the one it takes (``allow``): POST on the forwarded paths, GET on the
    gateway's own model list (which never reaches an engine, whatever the method)."""
    path = unquote_to_bytes(raw_path).decode("utf-8", "replace")
    own = models_path(path)
    verdict = check_path_safe(raw_path, encoded_slash=own)
    if not verdict.ok:
        return verdict
    if own:
        if method in (MODELS_METHOD, "HEAD"):
            return PathVerdict(False, 404, "not_found", f"{path} is answered by the gateway itself, never forwarded")
        return PathVerdict(False, 405, "method_not_allowed",
                           f"{path} takes {MODELS_METHOD}, not {method}: the gateway answers it with the models "
                           f"it serves", allow=MODELS_METHOD)
    if path not in FORWARDED_PATHS:
        return PathVerdict(False, 404, "not_found",
                           f"{path} is not an inference API path the gateway forwards; it forwards "
                           f"{', '.join(FORWARDED_PATHS)} (with {FORWARDED_METHOD}) and answers "
                           f"{MODELS_METHOD} {MODELS_PATH}")
    if method != FORWARDED_METHOD:
        return PathVerdict(False, 405, "method_not_allowed",
                           f"{path} takes {FORWARDED_METHOD}, not {method}", allow=FORWARDED_METHOD)
    return PathVerdict(True)


def engine_serves(kind: str, path: str) -> PathVerdict:
    """Whether an engine of ``kind`` serves a forwarded path (the Messages API is served natively or
    translated by the gateway for every kind), or the 404 that says what it serves instead."""
    if path in OLLAMA_API_PATHS and kind != "ollama":
        return PathVerdict(False, 404, "not_found", f"{path} is Ollama's own API and this engine is {kind}; "
                                                    f"use /v1/chat/completions or /v1/completions")
    if path == EMBEDDINGS_PATH and kind in NO_EMBEDDINGS:
        return PathVerdict(False, 404, "not_found", f"a {kind} engine has no embeddings endpoint; it serves "
                                                    f"/v1/chat/completions, /v1/completions and /v1/messages")
    return PathVerdict(True)


# The web pages that may use the gateway from a browser, besides those the operator lists in ``[gateway]
# allowed_origins``: pages served from this machine, and the desktop app and editor shells Ollama allows too
# (ollama/ollama envconfig/config.go, ``AllowedOrigins``). Any other site's page is refused: a page can POST
# to 127.0.0.1 without a preflight (a text/plain "simple request"), and mlx_lm.server and llama-server answer
# every origin with ``Access-Control-Allow-Origin: *``. ``null`` is not among them: a sandboxed frame of any
# site sends it, as browsers do for a page opened from a local file.
DEFAULT_ALLOWED_ORIGINS = (
    *(f"{scheme}://{host}:*" for host in ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")
      for scheme in ("http", "https")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_HOST = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")  # a name or an IPv4 address, in lower case
_IPV6 = re.compile(r"\[[0-9a-f:.]+\]")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits only (str.isdigit takes "²" too)
_ORIGIN_FORMS = ('scheme://host[:port], where a * may stand for the port ("http://my-box.local:*"), for the '
                 'leading labels of the host ("https://*.example.com") or for the whole host and port ("app://*"); '
                 'or "*" (any site) or "null"')


def _split_origin(text: str) -> tuple[str, str, str | None] | None:
    """``scheme://host[:port]`` as (scheme, host, port or None), in lower case; None when it is not one."""
    scheme, sep, rest = text.lower().partition("://")
    if not sep or not _SCHEME.fullmatch(scheme) or not rest:
        return None
    if rest.startswith("["):
        end = rest.find("]") + 1
        host, after = rest[:end], rest[end:]
        if not end or (after and not after.startswith(":")):
            return None
        return scheme, host, after[1:] if after else None
    host, colon, port = rest.partition(":")
    return scheme, host, port if colon else None


def _host_ok(host: str) -> bool:
    return bool(_HOST.fullmatch(host) or _IPV6.fullmatch(host))


def _split_authority(text: str) -> tuple[str, str | None]:
    """``host[:port]`` (a Host header's value) as (host, port or None), in lower case, without a trailing dot."""
    text = text.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        host, after = (text[1:end], text[end + 1:]) if end > 0 else (text, "")
        if after and not (after.startswith(":") and _PORT.fullmatch(after[1:])):
            return text, None  # "[::1].attacker.example" is a name, not an address
        port = after[1:] if after else None
    else:
        name, colon, port_text = text.rpartition(":")
        host, port = (name, port_text) if colon and _PORT.fullmatch(port_text) else (text, None)
    return host.rstrip("."), port


def origin_pattern_error(pattern: str) -> str | None:
    """Why ``pattern`` is not an origin the gateway can allow, naming what is (None: it is one)."""
    if pattern.lower() in ("*", "null"):
        return None
    parts = _split_origin(pattern)
    if parts is None:
        return f"expected {_ORIGIN_FORMS}"
    scheme, host, port = parts
    if "*" in host and host != "*" and not host.startswith("*."):
        return f"{host!r}: a * stands for whole leading labels of a name (\"*.example.com\"), never part of one; " \
               f"expected {_ORIGIN_FORMS}"
    named = host.removeprefix("*.")
    if host != "*" and not _host_ok(named):
        return f"{host!r} is not a host name or address (an origin has no path, user or query); expected {_ORIGIN_FORMS}"
    if host.startswith("*.") and not any(c.isalpha() for c in named):
        return f"{host!r}: a * stands for the leading labels of a name, not for part of an address; expected {_ORIGIN_FORMS}"
    if port is not None and port != "*" and not (_PORT.fullmatch(port) and str(int(port)) == port and 0 < int(port) < 65536):
        return f"{port!r} is not a port (1 to 65535, as browsers write it); expected {_ORIGIN_FORMS}"
    if host == "*" and port is not None:
        return f'"{scheme}://*" already stands for every host and port; expected {_ORIGIN_FORMS}'
    if port is not None and _DEFAULT_PORTS.get(scheme) == port:
        return f"browsers leave the default port out of an origin: write {scheme}://{host}"
    return None


def origins_admitting_any_site(allowed: Sequence[str]) -> list[str]:
    """The entries of ``allowed_origins`` that let pages of sites nobody vetted in: every site (``"*"``,
    ``"https://*"``), every sandboxed frame (``"null"``, which any site can make), or every name under a
    top-level domain (``"https://*.com"``; a name under a shared host such as ``*.github.io`` is the
    operator's to judge)."""
    broad = []
    for pattern in allowed:
        lowered = pattern.lower()
        parts = _split_origin(lowered)
        host = parts[1] if parts is not None else ""
        if lowered in ("*", "null") or (parts is not None and parts[0] in _DEFAULT_PORTS and (
                host == "*" or (host.startswith("*.") and "." not in host[2:]))):
            broad.append(pattern)
    return broad


def origin_allowed(origin: str, allowed: Sequence[str] = (), *, host: str | None = None) -> bool:
    """Whether a browser page of ``origin`` (its ``Origin`` header) may use the gateway: the gateway's own
    origin (``host``: the request's ``Host``, which the page was served under), one of
    ``DEFAULT_ALLOWED_ORIGINS`` or of ``allowed`` (the operator's ``allowed_origins``, each valid for
    ``origin_pattern_error``; ``"*"``: any site). A ``*`` stands for a port (a page on the default port
    too), for the leading labels of a host, or for a whole host and port; never for part of a label."""
    listed = [p.lower() for p in allowed]
    if "*" in listed:
        return True
    origin = origin.strip().lower()
    if origin == "file://":  # what Electron apps send for their pages
        return "file://*" in (*listed, *DEFAULT_ALLOWED_ORIGINS)
    parts = _split_origin(origin)
    if parts is None:
        return origin == "null" and "null" in listed
    scheme, name, port = parts
    if not _host_ok(name) or (port is not None and not _PORT.fullmatch(port)):
        return False  # no browser sends that
    if host:
        own_name, own_port = _split_authority(host)
        default = _DEFAULT_PORTS.get(scheme)
        if own_name == name.strip("[]").rstrip(".") and (own_port or default) == (port or default):
            return True  # the page is the gateway's own (its status page, or behind an allowed proxy name)
    for pattern in (*listed, *DEFAULT_ALLOWED_ORIGINS):
        split = _split_origin(pattern)
        if split is None or split[0] != scheme:
            continue
        _, want_host, want_port = split
        if want_host == "*":
            return True
        if want_host.startswith("*."):
            if not name.endswith(want_host[1:]) or len(name) <= len(want_host) - 1:
                continue
        elif want_host != name:
            continue
        if want_port == "*" or want_port == port:
            return True
    return False


# The names a gateway on loopback answers besides IP addresses, names without a dot, the machine's own name and
# ``[gateway] allowed_hosts``: names that only this machine or its network resolve (as Ollama's ``allowedHost``,
# ollama/ollama server/routes.go, which also refuses names without a dot other than localhost). Any other name
# may be another site's, pointed at 127.0.0.1 by its DNS ("DNS rebinding"): its pages are then the gateway's
# own origin, and read what a GET returns.
LOCAL_HOST_SUFFIXES = (".localhost", ".local", ".internal")


def host_check_applies(*, loopback: bool, key_needed: bool) -> bool:
    """Whether requests are checked for the name they were sent to (``host_allowed``): on a loopback listen
    where a request may do something without the key. Where every request needs the key, a page of a
    rebound name has none; off loopback every request needs it."""
    return loopback and not key_needed


def host_allowed(host_header: str | None, allowed: Sequence[str] = (), *, machine_names: Sequence[str] = ()) -> bool:
    """Whether a request may be answered under the name in its ``Host`` header (where ``host_check_applies``):
    none given (HTTP/1.0), an IP address, a name without a dot (``localhost``, a machine's) or under
    ``LOCAL_HOST_SUFFIXES``, one of ``machine_names`` (this machine's), or one of ``allowed`` (``"*"``: any;
    ``"*.example.com"``: the names under it)."""
    if not host_header:
        return True
    host, _ = _split_authority(host_header)
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True  # a page cannot make an address another site's
    except ValueError:
        pass
    if "." not in host or host.endswith(LOCAL_HOST_SUFFIXES):
        return True  # localhost, a name of the local network: no site's DNS gives out a name without a dot
    for pattern in (*allowed, *machine_names):
        pattern = pattern.lower().rstrip(".")
        if pattern == "*" or pattern == host or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def hosts_admitting_any_site(allowed: Sequence[str]) -> list[str]:
    """The entries of ``allowed_hosts`` under which any site's name may arrive (``"*"``, ``"*.com"``): a
    rebound page's GETs are then answered (though it is never taken for the gateway's own page, ``own_host``)."""
    return [h for h in allowed if h == "*" or (h.startswith("*.") and "." not in h[2:].rstrip("."))]


def own_host(host_header: str | None, allowed: Sequence[str] = (), *, checked: bool,
             machine_names: Sequence[str] = ()) -> str | None:
    """The name a request was sent to, when a page served under it is the gateway's own (``origin_allowed``'s
    ``host``); None when it is not: where names are ``checked``, one that came in only through an entry of
    ``hosts_admitting_any_site`` may be any site's."""
    if not checked:
        return host_header
    broad = set(hosts_admitting_any_site(allowed))
    narrow = [h for h in allowed if h not in broad]
    return host_header if host_allowed(host_header, narrow, machine_names=machine_names) else None


def host_name_error(name: str) -> str | None:
    """Why ``name`` is not a host name ``allowed_hosts`` can hold (None: it is one, ``"*.name"`` or ``"*"``)."""
    if name == "*" or _HOST.fullmatch(name.lower().rstrip(".").removeprefix("*.")):
        return None
    return (f"{name!r} is not a host name; expected a name as clients send it in Host, without scheme or port, "
            'such as "llm.example.com", "*.trycloudflare.com" (the names under it) or "*" (any name)')


class SwapPermission(StrEnum):
    """``[gateway] swaps``: may a request make the daemon start or swap an engine?"""

    ALLOWED = "allowed"  # any client of the gateway (the default on loopback)
    WITH_KEY = "with_key"  # only a request that carries the gateway's API key
    NEVER = "never"  # only an operator (llmctl start / switch)


def key_needed_to_use(permission: SwapPermission, *, has_key: bool, loopback: bool) -> bool:
    """Whether every request must carry the gateway's API key, or (``"with_key"`` on a loopback gateway)
    only one that would start or swap an engine: there the key is what separates the operator's tools
    from the other local users, who may use the engines that are resident but not swap them. Off
    loopback a key is needed for any use (the network may not use the models at all without one)."""
    if not has_key:
        return False
    return not (permission is SwapPermission.WITH_KEY and loopback)


def may_start_engine(permission: SwapPermission, *, key_given: bool) -> bool:
    """Whether a request for an engine that is not resident may start it (swapping others out)."""
    if permission is SwapPermission.ALLOWED:
        return True
    if permission is SwapPermission.WITH_KEY:
        return key_given
    return False


def start_refused_message(engine: str, state: str, permission: SwapPermission) -> str:
    """What a request that may not start ``engine`` (``may_start_engine`` said no, or it waited to be sent
    again and the engine went down meanwhile) is told, and who can start it."""
    if permission is SwapPermission.ALLOWED:  # a resend: it never starts the engine
        return (f"engine {engine!r} is {state}: it went down while this request waited to be sent to it again, "
                f"and is not started again for it; a new request or `llmctl start {engine}` starts it")
    who = "an operator" if permission is SwapPermission.NEVER else "a request with the gateway's API key"
    return (f"engine {engine!r} is {state} and this gateway does not start or swap engines for requests "
            f"(gateway.swaps = {permission.value!r}); {who} can start it (llmctl start {engine})")


class Admission(StrEnum):
    RUN = "run"
    QUEUE = "queue"
    REFUSE = "refuse"


def admit_request(*, running: int, waiting: int, max_concurrent: int, max_queue: int) -> Admission:
    """Run now while fewer than ``max_concurrent`` run; else wait in a FIFO line of up to
    ``max_queue``; else refuse (429). ``max_concurrent = 0`` means no limit."""
    if max_concurrent <= 0 or (running < max_concurrent and waiting == 0):
        return Admission.RUN
    if waiting < max_queue:
        return Admission.QUEUE
    return Admission.REFUSE


def room_to_wait_for_engine(*, held: int, running: int, waiting: int, max_concurrent: int, max_queue: int) -> bool:
    """Whether a request for an engine that does not serve yet (loading, swapping in) may wait for it: once it
    serves, the ``held`` requests already waiting for it, and those running or in its line, take its
    ``max_concurrent`` slots and ``max_queue`` places first; a request beyond them would only wait out the
    load to be refused then, so it is refused now. ``max_concurrent = 0`` means no limit."""
    return max_concurrent <= 0 or held + running + waiting < max_concurrent + max_queue


def retry_after_s(*, waiting: int, max_concurrent: int, typical_request_s: float = 10.0) -> int:
    """A Retry-After for a refused request: about how long the line ahead takes to drain."""
    per_slot = max(1, max_concurrent)
    return max(1, min(300, round((waiting / per_slot + 1) * typical_request_s)))


# Descriptors the gateway holds besides two per request in flight (the client's and the engine's): its listening
# socket, its channel to the daemon, its log, kept-alive client connections between their requests.
OPEN_FILES_RESERVE = 256
# macOS refuses a soft RLIMIT_NOFILE above OPEN_MAX (sys/syslimits.h: 10240), whatever the hard limit says.
MACOS_OPEN_MAX = 10240


def open_files_wanted(max_connections: int) -> int:
    """The descriptors a gateway taking ``max_connections`` requests at once may need: two per request (each
    proxied stream holds the client's connection and the engine's), and the reserve."""
    return 2 * max_connections + OPEN_FILES_RESERVE


def open_files_soft_limit(*, soft: int, hard: int, wanted: int, darwin: bool, unlimited: int = -1) -> int:
    """The soft limit on open files to run with: ``wanted`` where the hard limit allows it (at most OPEN_MAX on
    macOS), never lower than it is (``soft``); ``unlimited`` is how the platform spells no limit."""
    if soft == unlimited or soft >= wanted:
        return soft
    cap = wanted if hard == unlimited else min(hard, wanted)
    if darwin:
        cap = min(cap, MACOS_OPEN_MAX)
    return max(soft, cap)


def idle_unload_due(*, idle_unload_s: float | None, last_request_s: float | None, ready_since_s: float,
                    now_s: float, in_flight: int) -> bool:
    """An engine is unloaded after ``idle_unload_s`` without a real request (canaries do not count),
    never while a request is in flight; the clock starts at the last request, or when it became ready."""
    if not idle_unload_s or in_flight > 0:
        return False
    since = max(ready_since_s, last_request_s or ready_since_s)
    return now_s - since >= idle_unload_s


@dataclass(frozen=True, slots=True)
class HeldGroup:
    """Requests for one engine held until it serves: how many, and when the first of them arrived."""

    engine: str
    oldest_s: float
    requests: int
    exclusive: bool = False  # an exclusive engine shares the machine with no other


@dataclass(frozen=True, slots=True)
class ServeGroup:
    """Serve ``engine``'s held requests next (all of them together), swapping it in if needed."""

    engine: str
    message: str


def next_group(groups: Sequence[HeldGroup], *, resident: str | None) -> ServeGroup | None:
    """Which engine's held requests are served next when engines take turns (exclusive swaps).

    Requests are grouped by engine and the groups served in the order their first request arrived:
    all of A's held requests together, then all of B's, never alternately, so a mixed queue costs one
    swap per group instead of one per request (a swap of a large model takes minutes). A request that
    arrives for an engine while another engine's group waits joins its own engine's next group
    rather than jumping the line, so no group waits behind an endless stream of the other's. On a
    tie the resident engine goes first (no swap needed).
    """
    waiting = [g for g in groups if g.requests > 0]
    if not waiting:
        return None
    first = min(waiting, key=lambda g: (g.oldest_s, g.engine != resident, g.engine))
    behind = ", ".join(f"{g.engine} ({g.requests})" for g in sorted(waiting, key=lambda g: g.oldest_s) if g is not first)
    return ServeGroup(first.engine, f"serve the {first.requests} held request(s) for {first.engine} together, "
                                    f"first in line since their first arrived; then {behind or 'nothing else waits'}")


def groups_to_serve(groups: Sequence[HeldGroup], *, resident: str | None) -> list[ServeGroup]:
    """Every engine whose held requests may be served now: the first in line (``next_group``), and each
    later group that conflicts with no group ahead of it in line.

    Only engines that cannot share the machine (one of the two is exclusive) take turns: a group for an
    engine that can run next to the ones ahead of it (budget engines) is not held behind them, so one
    engine reloading after a crash does not keep another, stopped one from starting for its requests.
    """
    first = next_group(groups, resident=resident)
    if first is None:
        return []
    waiting = sorted((g for g in groups if g.requests > 0), key=lambda g: (g.oldest_s, g.engine != resident, g.engine))
    chosen = [first]
    for i, group in enumerate(waiting):
        if group.engine == first.engine:
            continue
        ahead = waiting[:i]
        if any(a.exclusive or group.exclusive for a in ahead):
            continue
        chosen.append(ServeGroup(group.engine, f"serve the {group.requests} held request(s) for {group.engine} now: "
                                               f"it can run next to the engines ahead of it in line"))
    return chosen


def holds_for_groups(engine: str, *, serving: bool, conflicting_groups: int) -> bool:
    """Whether a new request for ``engine`` waits in its engine's group instead of going straight in:
    when the engine is not serving, or when a group for an engine it cannot share the machine with
    (one of the two is exclusive) is waiting for its turn."""
    return not serving or conflicting_groups > 0


def gateway_may_pass(*, serving: bool, draining: bool, held_groups: int) -> bool:
    """Whether the gateway may send requests for an engine straight on without asking the daemon
    (a *pass*), until the daemon takes the pass back.

    Only the plainest case earns one: the engine serves, it is not draining, and no request of any
    engine is held for a turn (then no swap is pending, so ``holds_for_groups`` lets every request
    for a serving engine through). Everything else (a swap to decide, a start, a refusal) is asked
    of the daemon, request by request.
    """
    return serving and not draining and held_groups == 0


def swap_may_start(unstarted_ages_s: Sequence[float], *, max_wait_s: float, passes_closed: bool = True) -> bool:
    """Whether the swap for the group whose turn it is may start: only once every request already
    let through to the engines it would stop has reached its engine (started there, where a swap's
    drain waits for it), so that the swap never stops an engine under a request on its way in.

    ``unstarted_ages_s`` are how long ago each such request was let through. One that has not
    started after ``max_wait_s`` is taken as lost (its client left, it was refused after routing):
    a lost notification must not keep the turns waiting for ever.

    ``passes_closed``: the gateway has confirmed that it took back its passes (``gateway_may_pass``).
    Until then it may still let requests through on its own, which the daemon has not counted yet,
    so no swap starts; this wait has no time limit, the gateway answers within milliseconds (and a
    gateway that dies takes its passes with it).
    """
    return passes_closed and all(age_s >= max_wait_s for age_s in unstarted_ages_s)


# The generation paths whose non-streamed answers can be fetched as streams and rebuilt (``fetch_as_stream``).
STREAMABLE_PATHS = frozenset(("/v1/chat/completions", "/v1/completions"))
# Request fields a rebuilt answer could not give back as the engine would have: several choices, log
# probabilities (mlx_lm.server streams none: mlx_lm/server.py ``handle_completion`` passes them only to the
# non-streamed response; llama-server's own ``n_probs``), a completion's echoed prompt.
_NOT_REBUILT_FIELDS = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "n_probs")


def fetch_as_stream(path: str, doc: object, *, steps_watched: bool, enabled: bool = True) -> bool:
    """Whether a non-streamed generation request is sent to its engine as a stream, and the engine's stream
    rebuilt into the one answer the client asked for.

    A non-streamed answer sends nothing until it is whole: without a step counter that shows silence (vLLM's
    and SGLang's do: ``steps_watched``), the watchdog would have no evidence of the engine's progress while it
    runs, and no canary runs beside it (it would queue behind it on a one-slot engine). Streamed, its tokens
    are that evidence, and a stall is seen at the stall limits instead of after the read timeout. Only plain
    requests are rebuilt: one choice, no log probabilities, no echo (``_NOT_REBUILT_FIELDS``).
    """
    if not enabled or steps_watched or path not in STREAMABLE_PATHS or not isinstance(doc, dict):
        return False
    if doc.get("stream") is True:
        return False
    n = doc.get("n")
    if n is not None and n != 1:
        return False
    return not any(doc.get(name) not in (None, False, 0) for name in _NOT_REBUILT_FIELDS)


# Statuses Anthropic's Messages API answers with (docs.anthropic.com, "Errors"; 503 and 504 as a proxy in front
# of it sends them, which its SDKs retry like 529).
MESSAGES_STATUSES = frozenset({400, 401, 403, 404, 413, 429, 500, 502, 503, 504, 529})


def translated_error_status(engine_status: int, engine_kind: str) -> int:
    """The status a Messages client gets for the engine's error answer to its translated request: the engine's own,
    so a 429 or 503 stays one a client waits out and a 401 one it does not retry, except where the Messages API
    has no such status (a 422: 400; a 501: 502) and mlx_lm.server's 404, its answer to any exception while
    preparing a generation (a chat template that fails, an unknown model path): a bad request, not a lost URL
    (mlx_lm/server.py, ``handle_completion``)."""
    if engine_status == 404 and engine_kind == "mlx_lm":
        return 400
    if engine_status in MESSAGES_STATUSES:
        return engine_status
    return 400 if engine_status < 500 else 502

