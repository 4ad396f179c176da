"""Render ``messages`` (a list of ``{role, content}``, optional tool calls) to one string.

Two ways:

* ``template="mood"`` (the default): the built-in rendering of the MOOD benchmark, Gemma's
  turn format. Every domain of the embedded benchmark is rendered through it, so that no
  detector can tell domains apart by format alone::

      <start_of_turn>user
      {system}\n\n{user text}<end_of_turn>
      <start_of_turn>model
      {assistant text}<end_of_turn>

  Gemma has no system or tool role: a system message is prepended to the first user turn,
  tool results become a user turn wrapped in ``<tool_response>``, and assistant tool calls
  are written as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` lines.
* a tokenizer (anything with ``apply_chat_template``): the model's own chat template.
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Any, Iterable, Mapping

# the MOOD rendering's turn markers (Gemma's); every reader of a rendered conversation uses these
TURN_START, TURN_END = "<start_of_turn>", "<end_of_turn>"


def turn_regex(role: str = "user|model", closed: bool = True) -> re.Pattern[str]:
    """The turns of a MOOD-rendered conversation whose role matches ``role`` (a regex
    alternative), with the groups ``role`` and ``text``; ``closed=False`` also matches a last turn
    cut before its end marker (a truncated or generated conversation)."""
    end = re.escape(TURN_END) if closed else f"(?:{re.escape(TURN_END)}|$)"
    return re.compile(f"{re.escape(TURN_START)}(?P<role>{role})\n(?P<text>.*?){end}", re.S)


ROLES = ("system", "user", "assistant", "tool")
BUILTIN_TEMPLATES = ("mood",)


def _tool_call_text(call: Mapping[str, Any]) -> str:
    fn = call.get("function", call)
    name = fn.get("name", "")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        from .readers import DocumentRefused, loads_json

        try:
            args = loads_json(args)
        except (json.JSONDecodeError, DocumentRefused):  # kept as the string it is
            pass
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False, sort_keys=True) + "</tool_call>"


def message_text(message: Mapping[str, Any]) -> str:
    """The visible text of one message: its content plus its tool calls, one per line."""
    content = message.get("content") or ""
    if not isinstance(content, str):
        content = json.dumps(content, ensure_ascii=False)
    calls = message.get("tool_calls") or []
    parts = [content.strip()] if content.strip() else []
    parts += [_tool_call_text(c) for c in calls]
    return "\n".join(parts)


def render_mood(messages: Iterable[Mapping[str, Any]]) -> str:
    """The built-in MOOD rendering (see module docstring)."""
    turns: list[tuple[str, str]] = []
    pending_system: list[str] = []
    for msg in messages:
        role = msg.get("role")
        text = message_text(msg)
        if role == "system":
            pending_system.append(text)
            continue
        if role == "tool":
            role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
        elif role == "assistant":
            role = "model"
        elif role != "user":
            raise ValueError(f"unknown role {role!r}")
        if pending_system and role == "user":
            text = "\n\n".join(pending_system + [text])
            pending_system = []
        turns.append((role, text))
    if pending_system:  # a system message with no user turn after it
        turns.insert(0, ("user", "\n\n".join(pending_system)))
    return "".join(f"{TURN_START}{role}\n{text}{TURN_END}\n" for role, text in turns)


def is_blank(text: str) -> bool:
    """True when ``text`` holds nothing to read: only whitespace, control characters and
    invisible format characters (zero-width space, BOM, ...). An empty conversation."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in text)


def has_text(messages: Iterable[Any]) -> bool:
    """True when some message holds visible text (its content or a tool call)."""
    return any(isinstance(m, Mapping) and not is_blank(message_text(m)) for m in messages)


def render_or_empty(messages: Iterable[Mapping[str, Any]], template: Any = "mood") -> str:
    """:func:`render`, or ``""`` when no message holds any text (``[]``, blank contents): the
    turn markers alone are not a conversation, and ``""`` is what a scorer refuses to score."""
    messages = list(messages)
    return render(messages, template) if has_text(messages) else ""


def render(messages: Iterable[Mapping[str, Any]], template: Any = "mood") -> str:
    """Render with the named built-in template or with a tokenizer's chat template."""
    messages = list(messages)
    if template is None or template == "mood":
        return render_mood(messages)
    if hasattr(template, "apply_chat_template"):
        plain = [{"role": m["role"], "content": message_text(m)} for m in messages]
        return template.apply_chat_template(plain, tokenize=False)
    raise ValueError(f"unknown chat template {template!r} (built-in: {', '.join(BUILTIN_TEMPLATES)})")
