"""An OpenAI chat request -> an Anthropic Messages request (pure: no I/O, no clock).

What is sent (Anthropic refuses fields it does not know, so the body is built from what it accepts, never passed
through):

- ``system`` / ``developer`` messages are lifted into ``system`` (text blocks, in order, wherever they stood);
  ``user`` / ``assistant`` / ``tool`` turns become content blocks, consecutive turns of one role merged into one
  message (Anthropic requires alternation); ``tool`` messages become ``tool_result`` blocks (first in their user
  turn, as Anthropic requires) with their ``tool_use_id``; ``image_url`` parts become image blocks (``data:`` URLs as
  base64, ``https`` URLs as url sources); a part's ``cache_control`` is kept (that is how a client asks for a cache
  write);
- an assistant turn's ``reasoning_details`` (what the answers carry: each thinking block's text and signature, or a
  redacted block's data) become thinking / redacted_thinking blocks again, first in the turn, so a tool-use
  conversation with thinking can continue; ``reasoning_content`` alone carries no signature and is not sent;
- ``tools`` (``input_schema`` = the function's ``parameters``), ``tool_choice`` (``auto``, ``none``, ``required`` ->
  ``any``, a named function -> ``tool``), ``parallel_tool_calls: false`` -> ``disable_parallel_tool_use``;
- ``stop`` -> ``stop_sequences``; ``user`` -> ``metadata.user_id``; ``top_k`` kept; ``max_tokens`` always (the
  request's one output limit, else the model card's max output); ``temperature`` clamped to Anthropic's 0..1
  (OpenAI's range is 0..2); ``top_p`` only without ``temperature`` (current Claude models refuse both at once);
- ``response_format``: ``json_schema`` on a deployment with the ``json_schema`` capability (structured outputs) ->
  ``output_config.format``; otherwise (and always for ``json_object``) a forced tool, :data:`JSON_TOOL`, whose input
  the answer returns as the message content, so the client always gets JSON text in ``message.content``;
- thinking (only on a deployment with the ``reasoning`` capability): the request's ``reasoning_effort`` or
  ``reasoning: {effort, max_tokens, enabled}``, else the deployment's ``reasoning_effort``. ``thinking: adaptive``
  deployments get ``thinking: {type: adaptive}`` and ``output_config.effort``; ``budget`` deployments get
  ``budget_tokens`` (``reasoning.max_tokens``, or a share of ``max_tokens`` by effort, at least 1024 and below
  ``max_tokens``). With thinking on, ``temperature`` / ``top_p`` / ``top_k`` are not sent (Anthropic refuses them
  with thinking), and a forced tool choice (``required``, a named function, or the JSON tool) turns thinking off
  (Anthropic refuses a forced tool with thinking), as does a last assistant tool-use turn sent back without its
  thinking blocks (Anthropic refuses to continue such a turn with thinking on; clients that drop unknown fields,
  like LangChain's ``ChatOpenAI``, send exactly that): the request is answered, without thinking.

Anything Anthropic cannot do as asked is a 400 naming the parameter: ``n > 1``, ``logprobs``, a ``function`` role,
a content part it has no block for, an image URL that is neither ``data:`` nor ``https``, tool-call arguments that
are not a JSON object.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from therouter.config import Deployment
from therouter.errors import InvalidRequest

JSON_TOOL = "json_response"  # the forced tool that carries a JSON answer (its input becomes message.content)
REASONING_FORMAT = "anthropic-claude-v1"  # reasoning_details entries we can send back (OpenRouter's name for it)
DEFAULT_MAX_TOKENS = 4096  # only when neither the request nor the card says (the gateway always passes the card's)
TEMPERATURE_MAX = 1.0
MIN_BUDGET = 1024  # Anthropic's smallest budget_tokens
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# share of max_tokens a `budget` deployment may think, by effort
BUDGET_SHARE = {"minimal": 0.1, "low": 0.2, "medium": 0.5, "high": 0.8, "xhigh": 0.9, "max": 0.95}
ADAPTIVE_EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh",
                   "max": "max"}
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.DOTALL)


def build_body(body: dict[str, Any], dep: Deployment, *, stream: bool, max_output: int | None) -> dict[str, Any]:
    """The Anthropic Messages body for one checked OpenAI chat body (see the module docstring)."""
    _refuse_unsupported(body)
    system, messages = _messages(body["messages"])
    max_tokens = body.get("max_tokens") or max_output or DEFAULT_MAX_TOKENS
    out: dict[str, Any] = {"model": dep.model, "max_tokens": max_tokens}
    if system:
        out["system"] = system
    out["messages"] = messages
    forced = _tools(body, dep, out)
    thinking = not forced and not _unsigned_tool_turn(messages) and _thinking(body, dep, out, max_tokens)
    if not thinking:
        _sampling(body, out)
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    if stream:
        out["stream"] = True
    return out


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if (body.get("n") or 1) > 1:
        raise InvalidRequest("This provider generates one choice per request; `n` must be 1.", param="n",
                             code="unsupported_parameter")
    if body.get("logprobs"):
        raise InvalidRequest("This provider does not return logprobs.", param="logprobs",
                             code="unsupported_parameter")


# ---- messages -------------------------------------------------------------------------------------------------------


def _messages(raw: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        role = m.get("role")
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            system.extend(_parts(m.get("content"), where + ".content", images=False))
            continue
        if role == "user":
            role, blocks = "user", _parts(m.get("content"), where + ".content", images=True)
        elif role == "assistant":
            blocks = _assistant(m, where)
        elif role == "tool":
            role, blocks = "user", [_tool_result(m, where)]
        else:
            raise InvalidRequest(f"The role '{role}' is not supported by this provider; use 'tool' messages.",
                                 param=where + ".role", code="unsupported_parameter")
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise InvalidRequest("The messages must include at least one user or assistant message besides the system "
                             "prompt.", param="messages", code="invalid_value")
    for t in turns:  # tool results lead their user turn
        if t["role"] == "user":
            t["content"].sort(key=lambda b: b.get("type") != "tool_result")
    return system, turns


def _parts(content: Any, where: str, *, images: bool) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if not part["text"]:
                continue
            block: dict[str, Any] = {"type": "text", "text": part["text"]}
        elif kind == "image_url" and images:
            block = _image(part.get("image_url"), at + ".image_url")
        else:
            raise InvalidRequest(f"The content part type '{str(kind)[:40]}' is not supported here by this provider.",
                                 param=at, code="unsupported_parameter")
        if isinstance(part.get("cache_control"), dict):
            block["cache_control"] = part["cache_control"]
        blocks.append(block)
    return blocks


def _image(spec: Any, where: str) -> dict[str, Any]:
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise InvalidRequest("An image_url part needs a `url` string.", param=where + ".url", code="invalid_value")
    if url.startswith("data:"):
        m = _DATA_URL.fullmatch(url)
        if m is None or m.group(1) not in IMAGE_TYPES:
            raise InvalidRequest("An image data URL must be `data:image/{jpeg,png,gif,webp};base64,...`.",
                                 param=where + ".url", code="invalid_value")
        return {"type": "image", "source": {"type": "base64", "media_type": m.group(1), "data": m.group(2)}}
    if url.startswith("https://"):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequest("An image URL must be an https:// URL or a data: URL.", param=where + ".url",
                         code="invalid_value")


def _assistant(m: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks = _thinking_blocks(m.get("reasoning_details"))
    content = m.get("content")
    if isinstance(content, list):  # an assistant's parts are text (or a refusal, said as text)
        content = [{"type": "text", "text": p.get("text") or p.get("refusal") or ""} if isinstance(p, dict) else p
                   for p in content]
    blocks.extend(_parts(content, where + ".content", images=False))
    for j, tc in enumerate(m.get("tool_calls") or ()):
        at = f"{where}.tool_calls[{j}]"
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(tc.get("id"), str):
            raise InvalidRequest("A tool call needs an `id` and a `function` with a `name`.", param=at,
                                 code="invalid_value")
        args = fn.get("arguments") or "{}"
        try:
            parsed = orjson.loads(args) if isinstance(args, str) else None
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise InvalidRequest("A tool call's arguments must be a JSON object (as text).",
                                 param=at + ".function.arguments", code="invalid_value")
        blocks.append({"type": "tool_use", "id": tc["id"], "name": fn["name"], "input": parsed})
    return blocks


def _thinking_blocks(details: Any) -> list[dict[str, Any]]:
    """reasoning_details from our answers -> thinking blocks, signatures intact (others' entries are not ours)."""
    blocks: list[dict[str, Any]] = []
    for d in details if isinstance(details, list) else ():
        if not isinstance(d, dict) or d.get("format", REASONING_FORMAT) != REASONING_FORMAT:
            continue
        if d.get("type") == "reasoning.text" and isinstance(d.get("signature"), str) and d["signature"]:
            blocks.append({"type": "thinking", "thinking": str(d.get("text") or ""), "signature": d["signature"]})
        elif d.get("type") == "reasoning.encrypted" and isinstance(d.get("data"), str):
            blocks.append({"type": "redacted_thinking", "data": d["data"]})
    return blocks


def _tool_result(m: dict[str, Any], where: str) -> dict[str, Any]:
    tool_use_id = m.get("tool_call_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise InvalidRequest("A tool message needs the `tool_call_id` of the call it answers.",
                             param=where + ".tool_call_id", code="missing_required_parameter")
    content = m.get("content")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id}
    if isinstance(content, str):
        block["content"] = content
    elif content:
        block["content"] = _parts(content, where + ".content", images=True)
    return block


# ---- tools and JSON -------------------------------------------------------------------------------------------------


def _tools(body: dict[str, Any], dep: Deployment, out: dict[str, Any]) -> bool:
    """Tools, tool_choice and response_format into ``out``; True when the tool choice is forced."""
    strict_ok = "json_schema" in dep.capabilities
    choice = body.get("tool_choice")
    tools = [] if choice == "none" and _json_tool_needed(body, dep) else [
        _tool(t, strict_ok) for t in body.get("tools") or ()]
    mapped = _tool_choice(choice) if tools else None
    schema = _response_format(body, dep, out)
    if schema is not None:  # the JSON answer rides on a forced tool
        tools.append({"name": JSON_TOOL, "description": "Give the answer as this tool's input: a JSON value that "
                      "matches its schema.", "input_schema": schema})
        if mapped is None or mapped["type"] in ("auto", "none"):
            mapped = {"type": "tool", "name": JSON_TOOL} if len(tools) == 1 else {"type": "any"}
    if not tools:
        return False
    out["tools"] = tools
    if mapped is not None:
        if body.get("parallel_tool_calls") is False and mapped["type"] != "none":
            mapped["disable_parallel_tool_use"] = True
        out["tool_choice"] = mapped
    elif body.get("parallel_tool_calls") is False:
        out["tool_choice"] = {"type": "auto", "disable_parallel_tool_use": True}
    return out.get("tool_choice", {}).get("type") in ("any", "tool")


def _tool(t: dict[str, Any], strict_ok: bool) -> dict[str, Any]:
    fn = t["function"]
    tool: dict[str, Any] = {"name": fn["name"],
                            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if fn.get("description"):
        tool["description"] = fn["description"]
    if fn.get("strict") and strict_ok:
        tool["strict"] = True
    return tool


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        return {"type": {"auto": "auto", "none": "none", "required": "any"}[choice]}
    fn = choice.get("function") if isinstance(choice, dict) else None
    if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or {type: function, function: {name}}.",
                             param="tool_choice", code="invalid_value")
    return {"type": "tool", "name": fn["name"]}


def _json_tool_needed(body: dict[str, Any], dep: Deployment) -> bool:
    rf = body.get("response_format")
    kind = rf.get("type") if isinstance(rf, dict) else None
    return kind == "json_object" or (kind == "json_schema" and "json_schema" not in dep.capabilities)


def _response_format(body: dict[str, Any], dep: Deployment, out: dict[str, Any]) -> dict[str, Any] | None:
    """Structured outputs into ``out``, or the schema the forced JSON tool must take (None: no JSON asked)."""
    rf = body.get("response_format")
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        return None
    spec = rf.get("json_schema") if isinstance(rf, dict) else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        schema = {"type": "object"}
    if "json_schema" in dep.capabilities:
        out.setdefault("output_config", {})["format"] = {"type": "json_schema", "schema": schema}
        return None
    return schema


# ---- thinking and sampling ------------------------------------------------------------------------------------------


def _unsigned_tool_turn(messages: list[dict[str, Any]]) -> bool:
    """The last assistant turn called tools but came back without the thinking block that preceded them."""
    last: list[dict[str, Any]] = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), [])
    return any(b["type"] == "tool_use" for b in last) and last[0]["type"] not in ("thinking", "redacted_thinking")


def _thinking(body: dict[str, Any], dep: Deployment, out: dict[str, Any], max_tokens: int) -> bool:
    """Thinking into ``out`` as the deployment takes it; True when it is on."""
    if "reasoning" not in dep.capabilities:
        return False
    effort, budget = _asked_reasoning(body)
    if effort is None and budget is None:
        effort = dep.reasoning_effort
    if effort == "none" or (effort is None and budget is None):
        return False
    if dep.thinking == "adaptive":
        out["thinking"] = {"type": "adaptive"}
        if effort in ADAPTIVE_EFFORT:
            out.setdefault("output_config", {})["effort"] = ADAPTIVE_EFFORT[effort]
        return True
    if budget is None:
        budget = int(max_tokens * BUDGET_SHARE.get(effort or "medium", 0.5))
    budget = min(max(budget, MIN_BUDGET), max_tokens - 1)
    if budget < MIN_BUDGET:
        return False  # max_tokens leaves no room for Anthropic's smallest thinking budget
    out["thinking"] = {"type": "enabled", "budget_tokens": budget}
    return True


def _asked_reasoning(body: dict[str, Any]) -> tuple[str | None, int | None]:
    """(effort, budget) the request asks for: OpenAI's ``reasoning_effort`` or OpenRouter's ``reasoning``."""
    effort = body.get("reasoning_effort") if isinstance(body.get("reasoning_effort"), str) else None
    budget = None
    r = body.get("reasoning")
    if isinstance(r, dict):
        if r.get("enabled") is False:
            return "none", None
        if isinstance(r.get("effort"), str):
            effort = r["effort"]
        mt = r.get("max_tokens")
        if isinstance(mt, int) and not isinstance(mt, bool) and mt > 0:
            budget = mt
        if effort is None and budget is None and r.get("enabled") is True:
            effort = "medium"
    return effort, budget


def _sampling(body: dict[str, Any], out: dict[str, Any]) -> None:
    """temperature clamped to 0..1; top_p only without temperature (current Claude models refuse both at once)."""
    for k in ("temperature", "top_p", "top_k"):
        v = body.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or (k == "top_p" and "temperature" in out):
            continue
        out[k] = min(float(v), TEMPERATURE_MAX) if k == "temperature" else v
