"""Function calling in OpenAI's shape: validating `tools`/`tool_choice`, getting the tools into the prompt,
and turning the model's output back into `tool_calls`.

Calls are written in the Hermes format that Qwen's chat templates use: `<tool_call>{"name": ...,
"arguments": {...}}</tool_call>`. A template that knows about tools (Qwen's) renders them itself; for one
that does not (SmolLM2's), the tools and the format go into the system message and earlier calls and
results are rendered as text, the way Qwen's template would. With `tool_choice` "required" or a named
function the output is constrained to one call object whose arguments match the function's JSON schema,
so it always parses; with "auto" the calls are parsed out of free text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from engine.errors import APIError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALLS = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


@dataclass(frozen=True)
class ToolRequest:
    tools: list[dict[str, Any]]  # OpenAI's [{"type": "function", "function": {name, description, parameters}}]
    choice: str  # "auto", "required", or the name of the function that must be called

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def call_schema(self) -> dict[str, Any]:
        """JSON schema of the one call a forced choice must produce."""
        functions = [
            t["function"] for t in self.tools if self.choice == "required" or t["function"]["name"] == self.choice
        ]
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f["name"]},
                    "arguments": f.get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in functions
        ]
        return options[0] if len(options) == 1 else {"anyOf": options}


def parse_tool_request(body: dict[str, Any]) -> ToolRequest | None:
    """The request's tools and choice; None when no tool may be called (no tools, or tool_choice "none")."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise APIError(400, "'tools' must be a non-empty list", param="tools")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param="tools")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise APIError(400, f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -", param="tools")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        names.append(name)
    if choice is None or choice == "auto":
        return ToolRequest(tools, "auto")
    if choice == "none":
        return None
    if choice == "required":
        return ToolRequest(tools, "required")
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(named, str):
        raise APIError(
            400,
            "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    if named not in names:
        raise APIError(400, f"'tool_choice' names {named!r}, which is not among the tools {names}", param="tool_choice")
    return ToolRequest(tools, named)


# ---------------------------------------------------------------------------------------------- prompts


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    """What a tool-aware template (Qwen's) tells the model, for templates that say nothing themselves."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listing}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f'{OPEN}{CLOSE} XML tags:\n{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}'
    )


def messages_as_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Messages for a template without tool support: tools in the system message, earlier calls and their
    results as text in the Hermes format."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [c.get("function", {}) for c in m["tool_calls"] if isinstance(c, dict)]
            text = "\n".join(
                f'{OPEN}\n{{"name": {json.dumps(c.get("name"))}, "arguments": {_arguments_text(c)}}}\n{CLOSE}'
                for c in calls
            )
            out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + text).strip()})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + tools_system_text(tools)}
        else:
            out.insert(0, {"role": "system", "content": tools_system_text(tools)})
    return out


def _arguments_text(function: dict[str, Any]) -> str:
    arguments = function.get("arguments", {})
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- outputs


def openai_call(name: str, arguments: Any) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def extract_calls(text: str, request: ToolRequest) -> tuple[str | None, list[dict[str, Any]]]:
    """(content left over, tool calls) of a finished output. A forced choice's output is the call object
    itself; with "auto", every well-formed <tool_call> block naming a given tool is a call."""
    if request.forced:
        try:
            call = json.loads(text)
            return None, [openai_call(call["name"], call["arguments"])]
        except (json.JSONDecodeError, KeyError, TypeError):
            return text, []  # cut short by max_tokens: report the text as it is
    names = {t["function"]["name"] for t in request.tools}
    calls = []
    for block in _CALLS.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and call.get("name") in names:
            calls.append(openai_call(call["name"], call.get("arguments", {})))
    if not calls:
        return text, []
    content = _CALLS.sub("", text).strip()
    return content or None, calls


class ToolStream:
    """Streams a choice's text while holding back whatever may be (part of) a tool call; the calls are
    sent once the output is complete."""

    def __init__(self, request: ToolRequest) -> None:
        self.request = request
        self.text = ""  # everything generated
        self.sent = 0  # characters of `text` already streamed as content

    def feed(self, delta: str) -> str:
        """The part of the text seen so far that is surely content, not yet sent."""
        self.text += delta
        if self.request.forced:
            return ""
        start = self.text.find(OPEN, self.sent)
        safe = len(self.text) if start < 0 else start
        if start < 0:  # a partial "<tool_ca" at the end may still become a call
            for k in range(min(len(OPEN) - 1, len(self.text)), 0, -1):
                if OPEN.startswith(self.text[-k:]):
                    safe = len(self.text) - k
                    break
        piece = self.text[self.sent : max(self.sent, safe)]
        self.sent = max(self.sent, safe)
        return piece

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content not yet sent, the calls) once the output is complete."""
        content, calls = extract_calls(self.text, self.request)
        if not calls:
            return self.text[self.sent :], []
        rest = (content or "")[self.sent :] if content and content.startswith(self.text[: self.sent]) else ""
        return rest, calls
