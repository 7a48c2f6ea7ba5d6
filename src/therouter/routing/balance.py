"""Load-balancing arithmetic: pure functions, the RNG injected.

- ``weighted_order``: a weighted random order (sampling without replacement); weight 0 = only after all others.
- ``load_weight``: a deployment's weight discounted by its requests in flight, ``w * w / (w + in_flight)``. When
  in-flight counts are proportional to the weights the ratios are unchanged; a deployment that is slower than its
  weight says (more in flight per unit of weight) gets proportionally less new work.
- ``rendezvous``: weighted highest-random-weight hashing of a prompt prefix onto replicas, so requests sharing a
  prefix land on the replica that has it in its KV cache, and only ~1/N of prefixes move when a replica leaves.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def load_weight(weight: int, in_flight: int) -> float:
    if weight <= 0:
        return 0.0
    return weight * weight / (weight + max(in_flight, 0))


def weighted_order(items: Sequence[T], weight: Callable[[T], float], rng: random.Random) -> list[T]:
    pool = list(items)
    out: list[T] = []
    while pool:
        ws = [max(weight(x), 0.0) for x in pool]
        total = sum(ws)
        if total <= 0:
            out.extend(pool)
            break
        r = rng.random() * total
        acc = 0.0
        pick = len(pool) - 1
        for i, w in enumerate(ws):
            acc += w
            if r < acc and w > 0:
                pick = i
                break
        out.append(pool.pop(pick))
    return out


def _unit(prefix_hash: bytes, key: str) -> float:
    h = hashlib.blake2b(prefix_hash + key.encode(), digest_size=8).digest()
    return (int.from_bytes(h, "big") + 0.5) / 2.0**64  # in (0, 1)


def rendezvous(prefix: str, items: Sequence[T], key: Callable[[T], str], weight: Callable[[T], float]) -> T | None:
    """The item that owns ``prefix`` (weighted HRW: score = -w / ln(u)); None if every weight is 0."""
    ph = hashlib.blake2b(prefix.encode("utf-8", "replace"), digest_size=16).digest()
    best: T | None = None
    best_score = -math.inf
    for it in items:
        w = weight(it)
        if w <= 0:
            continue
        score = -w / math.log(_unit(ph, key(it)))
        if score > best_score:
            best, best_score = it, score
    return best


def prompt_prefix(body: Mapping[str, Any], chars: int) -> str:
    """The first ``chars`` characters of the prompt as the model sees it (roles and text of the leading messages)."""
    parts: list[str] = []
    size = 0
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if not isinstance(m, dict):
                continue
            text = _text(m.get("content"))
            piece = f"{m.get('role', '')}:{text}\n"
            parts.append(piece)
            size += len(piece)
            if size >= chars:
                break
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        parts.append(prompt if isinstance(prompt, str) else "")
    return "".join(parts)[:chars]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""
