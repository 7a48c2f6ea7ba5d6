"""What of an upstream's words may reach our logs, and what may reach the client.

- :func:`redact` (logs, attempt records): secrets are replaced: the provider's key in any encoding we can foresee
  (see :func:`secret_forms`), ``Bearer`` / ``Basic`` credentials, key-shaped tokens (``sk-``, ``tr-``, ...),
  ``api_key=...``-style assignments and JWTs. Everything else is kept: it is what an operator debugs with.
- :func:`sanitize` (the client, only for an upstream 4xx that explains the client's own mistake): :func:`redact`, then
  everything that describes the upstream's insides goes too: Python tracebacks, URLs, IP addresses, host:port pairs
  and file paths (unix and windows). What is left is the explanation.

Both are plain functions over strings, tested from nasty real-looking examples (tests/unit/providers/test_sanitize.py).
Patterns are anchored at token starts (look-behinds) so a long hostile body cannot make them backtrack quadratically,
and input is capped before any pattern runs.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from urllib.parse import quote, quote_plus

REDACTED = "[redacted]"
MAX_INPUT = 8000  # characters of upstream text looked at
MAX_DETAIL = 2000  # what a log line / attempt record keeps
MAX_CLIENT = 1000  # what a client's error message keeps
_MIN_FORM = 8  # shorter encodings of a key would redact ordinary words

# ---- secrets --------------------------------------------------------------------------------------------------------

_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # credentials after an auth scheme (the scheme stays, so the log still says what kind of thing was there)
    (re.compile(r"(?i)\b(bearer)\s+(?=[A-Za-z0-9._~+/=\-]*[0-9._~+/=\-])[A-Za-z0-9._~+/=\-]{8,}"), rf"\1 {REDACTED}"),
    (re.compile(r"(?i)\b(basic)\s+(?=[A-Za-z0-9+/]*[0-9+/=])[A-Za-z0-9+/]{8,}={0,2}"), rf"\1 {REDACTED}"),
    # key-shaped tokens: OpenAI / DeepSeek style, ours (tr-), HuggingFace, AWS access key ids
    (re.compile(r"(?i)(?<![\w\-])(?:sk|tr|key|rk|pk)-[A-Za-z0-9_\-]{6,}"), REDACTED),
    (re.compile(r"(?<!\w)(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{8,}"), REDACTED),
    (re.compile(r"(?<!\w)hf_[A-Za-z0-9]{16,}"), REDACTED),
    (re.compile(r"(?<![A-Z0-9])AKIA[0-9A-Z]{16}(?![A-Z0-9])"), REDACTED),
    # JWTs
    (re.compile(r"(?<![\w\-])eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"), REDACTED),
    # name = value credentials (headers echoed as "x-api-key: ...", query strings "?key=...", JSON "api_key": "...")
    (re.compile(r"(?i)\b(api[_\-]?key|x-api-key|access[_\-]?token|auth[_\-]?token|client[_\-]?secret|secret|"
                r"password|passwd|authorization)(\\?[\"']?\s*[:=]\s*\\?[\"']?)(?!\[redacted\])"
                r"(?:(?:bearer|basic)\s+)?[^\s\"',;&}\\]+"), rf"\1\2{REDACTED}"),
    (re.compile(r"(?i)([?&](?:key|token|sig|signature|access_token)=)[^&\s\"'#]+"), rf"\1{REDACTED}"),
)


def secret_forms(secret: str) -> tuple[str, ...]:
    """The spellings of ``secret`` an upstream might echo: as is, URL-encoded, hex, and base64 (standard and url-safe,
    at each of the three byte alignments it can have inside a longer encoded string). Longest first."""
    if not secret:
        return ()
    raw = secret.encode("utf-8", "surrogatepass")
    forms = {secret, quote(secret, safe=""), quote_plus(secret), raw.hex(), raw.hex().upper()}
    forms.add(re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), quote(secret, safe="")))
    for shift in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            s = enc(b"\0" * shift + raw).decode()
            first = -(-8 * shift // 6)  # the first character made only of the secret's bits
            last = (8 * (shift + len(raw)) - 6) // 6  # the last one
            forms.add(s[first:last + 1])
    return tuple(sorted((f for f in forms if len(f) >= _MIN_FORM or f == secret), key=len, reverse=True))


def _cap(text: str) -> str:
    """At most MAX_INPUT characters; a cut never leaves half a token behind (it may be half a key)."""
    if len(text) <= MAX_INPUT:
        return text
    head = text[:MAX_INPUT]
    cut = max(head.rfind(" "), head.rfind("\n"))
    return head[:cut] if cut > 0 else ""


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Text for our logs and records: every secret replaced, everything else kept (at most MAX_DETAIL chars)."""
    text = _cap(text)
    for s in secrets:
        if s:
            text = text.replace(s, REDACTED)
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text[:MAX_DETAIL]


# ---- what describes the upstream's insides ------------------------------------------------------------------------

_TRACEBACK = re.compile(
    r"Traceback \(most recent call last\):[^\n]*"  # the header (and, on one escaped line, everything after it)
    r"(?:\n[ \t]+[^\n]*)*"  # indented frame and source lines
    r"(?:\n[\w.]*(?:Error|Exception|Exit|Interrupt|Warning|Failure)\b[^\n]*)?"  # the exception line
)
_FRAME = re.compile(r"(?m)^[ \t]*File \"[^\"\n]*\", line \d+[^\n]*$")
_URL = re.compile(r"(?i)(?<![\w+.\-])[a-z][a-z0-9+.\-]*://[^\s\"'<>`]+")
_IPV6_CANDIDATE = re.compile(
    r"(?<![\w:.\[])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?:%[\w.]+)?(?![\w:])")
_IPV6_BRACKETED = re.compile(r"(?<![\w\]])\[[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(?:%[\w.]+)?\](?::\d{1,5})?")
_IPV4 = re.compile(r"(?<![\w.])(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}"
                   r"(?::\d{1,5})?(?![\w.])")
_HOST_PORT = re.compile(r"(?i)(?<![\w.\-])(?:localhost|[a-z0-9\-]++(?:\.[a-z0-9\-]++)+|[a-z0-9]++(?:-[a-z0-9]++)+)"
                        r":\d{2,5}(?!\w)")
_WINDOWS_PATH = re.compile(r"(?i)(?<![\w\\])(?:[a-z]:(?:\\+|/)|\\\\[\w.$\-]+\\+)"
                           r"(?:[^\\/\s\"'<>|:*?]+(?:\\+|/))*[^\\/\s\"'<>|:*?,;)]*")
_UNIX_PATH = re.compile(r"(?<![\w/.\-~\\])(?:~|\.{1,2})?/(?:[\w.@+\-]+/)*[\w@+\-]+(?:\.[\w\-]+)*/?")
_SPACES = re.compile(r"\s+")
_PLACEHOLDER = re.compile(r"\[(?:url|address|path|redacted)\]")
_WORD = re.compile(r"[^\W\d_]{2,}")  # two letters in a row: something a person wrote


def _ipv6(m: re.Match[str]) -> str:
    cand = m.group()
    try:
        ipaddress.IPv6Address(cand.split("%", 1)[0])
    except ValueError:
        return cand  # a time of day, a ratio, a C++ scope...
    return "[address]"


def sanitize(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Text an upstream 4xx sends about the client's request, fit for the client: secrets, tracebacks, URLs, IP
    addresses, host:port pairs and file paths removed; one line, at most MAX_CLIENT characters ("" if nothing
    useful is left)."""
    text = redact(text, secrets)
    text = _TRACEBACK.sub(" ", text)
    text = _FRAME.sub(" ", text)
    text = _URL.sub("[url]", text)
    text = _IPV6_BRACKETED.sub("[address]", text)
    text = _IPV6_CANDIDATE.sub(_ipv6, text)
    text = _IPV4.sub("[address]", text)
    text = _HOST_PORT.sub("[address]", text)
    text = _WINDOWS_PATH.sub("[path]", text)
    text = _UNIX_PATH.sub("[path]", text)
    text = _SPACES.sub(" ", text).strip()
    if not _WORD.search(_PLACEHOLDER.sub(" ", text)):
        return ""  # only placeholders and punctuation left: the caller says it in its own words
    if len(text) > MAX_CLIENT:
        text = text[:MAX_CLIENT - 3].rstrip() + "..."
    return text
