"""An adapter's chat template: how /v1/chat/completions turns messages into this adapter's encoder input,
recorded in adapter_config.json under `peftserve_chat_template` (a Jinja template over `messages`, each
{"role", "content"}, as Hugging Face chat templates are written) and stored with the registration.

Checked at registration (it must compile, in Jinja's sandbox, and be at most MAX_CHARS); rendered by the
server (serve/app/chat.py) in the same sandbox, so a template can read the messages and nothing else.
"""

from __future__ import annotations

CONFIG_KEY = "peftserve_chat_template"
MAX_CHARS = 16384


class ChatTemplateError(ValueError):
    """A chat template that cannot be used; the message says what to fix."""


def _environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)


def compile_template(source: str):
    """The compiled template, or ChatTemplateError naming the problem."""
    from jinja2 import TemplateError

    if not isinstance(source, str) or not source.strip():
        raise ChatTemplateError(f"{CONFIG_KEY} must be a non-empty string (a Jinja template over `messages`)")
    if len(source) > MAX_CHARS:
        raise ChatTemplateError(f"{CONFIG_KEY} has {len(source)} characters; at most {MAX_CHARS}")
    try:
        return _environment().from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"{CONFIG_KEY} is not a valid Jinja template: {e}") from None


def read_chat_template(config: dict) -> str | None:
    """The template an adapter_config.json records, validated; None when it records none."""
    source = config.get(CONFIG_KEY)
    if source is None:
        return None
    compile_template(source)
    return source


def render(source: str, messages: list[dict]) -> str:
    """The encoder input for `messages` ({"role", "content": str}); ChatTemplateError if rendering fails."""
    from jinja2 import TemplateError

    try:
        return compile_template(source).render(messages=messages).strip()
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None
