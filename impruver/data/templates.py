"""Chat templates by name (Jinja source, as ``tokenizer.chat_template`` holds it).

``tokenizer.chat_template`` in a plan is a registered name (below), a ``.jinja`` file, or inline Jinja source.
Templates get the variables Hugging Face templates get: ``messages``, ``tools``, ``add_generation_prompt`` and the
tokenizer's special tokens (``bos_token``, ``eos_token``...).

How a template sees impruver's roles is learned by rendering probe conversations (see
:class:`impruver.data.render.Renderer`), never by reading its source:

* one that renders OpenAI-style ``tool_calls`` gets them, all calls of a turn in one message where it renders
  several, and ``tool`` messages where it renders those (Qwen3, ...);
* one that knows the roles ``function_call`` / ``function_response`` (renders them, refuses a role nobody uses)
  gets impruver's roles as they are (saiga, chatml);
* any other gets a call as JSON text in an assistant turn and a tool's answer as a user turn.

A template that renders no ``tools=`` gets the function schemas in its system turn (as the system message's
``tools`` where it renders that, as Phi-4-mini does), or in the first user turn when it has no system turn.
"""

from __future__ import annotations

from pathlib import Path

from impruver.errors import ConfigError, Problem, choices_hint
from impruver.registry import templates

# Saiga / rulm style for the rugpt3 and ruGPT-3.5 models (see rulm's saiga v2 prompt template): every turn is
# `<s>{role}\n{content}</s>\n`, the assistant's role is written `bot`; tool calls and their results are turns of
# their own (function_call / function_response). Generation starts after `<s>bot\n`.
# The turns the model writes are marked with {% generation %}: one rendering gives the trained spans (the same
# spans impruver finds from prefix renderings of unmarked templates; a test holds the two to agreement).
SAIGA = (
    "{%- for message in messages %}"
    "{%- set role = 'bot' if message['role'] == 'assistant' else message['role'] %}"
    "{#- roles: system, user, assistant (bot), function_call, function_response #}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'function_call', 'function_response'] %}"
    "{{- raise_exception('saiga turns are system, user, assistant, function_call or function_response, not '"
    " + message['role']) }}{%- endif %}"
    "{{- bos_token + role + '\\n' }}"
    "{%- if message['role'] in ['assistant', 'function_call'] %}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- bos_token + 'bot\\n' }}{%- endif %}"
)

# zephyr (HuggingFaceH4/zephyr-7b-beta; the TinyLlama-1.1B-Chat-v1.0 template, verbatim).
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# ChatML (<|im_start|>role ... <|im_end|>); tool calls and results as turns named function_call / function_response.
CHATML = (
    "{%- for message in messages %}"
    "{#- roles: system, user, assistant, function_call, function_response #}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'function_call', 'function_response'] %}"
    "{{- raise_exception('chatml turns are system, user, assistant, function_call or function_response, not '"
    " + message['role']) }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] in ['assistant', 'function_call'] %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# The same templates in Ollama's Go-template syntax, for the Modelfile beside a GGUF file (``impruver export
# --gguf``). Ollama renders ``.Messages`` (``.Role``: system, user, assistant, tool; ``.Content``) and the model
# writes after the text, so each form ends with the assistant turn's header (add_generation_prompt).
# <<bos>> and <<eos>> stand for the tokenizer's own bos_token / eos_token strings (filled in by ollama_form).
# Ollama calls a tool's answer `tool`: saiga and chatml were trained on impruver's function_response.
OLLAMA_SAIGA = (
    '{{- range .Messages }}<<bos>>{{ if eq .Role "assistant" }}bot{{ else if eq .Role "tool" }}function_response'
    "{{ else }}{{ .Role }}{{ end }}\n"
    "{{ .Content }}<<eos>>\n"
    "{{ end }}<<bos>>bot\n"
)
OLLAMA_ZEPHYR = (
    '{{- range .Messages }}{{ if or (eq .Role "user") (eq .Role "system") (eq .Role "assistant") }}'
    "<|{{ .Role }}|>\n{{ .Content }}<<eos>>\n{{ end }}{{ end }}<|assistant|>\n"
)
OLLAMA_CHATML = (
    '{{- range .Messages }}<|im_start|>{{ if eq .Role "tool" }}function_response{{ else }}{{ .Role }}{{ end }}\n'
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)


@templates("saiga")
def saiga() -> str:
    """Saiga / rulm turns ``<s>{role}\\n{content}</s>\\n`` (assistant = bot), for rugpt3 and ruGPT-3.5."""
    return SAIGA


@templates("zephyr")
def zephyr() -> str:
    """zephyr-7b-beta's template (``<|user|>\\n...</s>``), as TinyLlama-Chat ships it."""
    return ZEPHYR


@templates("chatml")
def chatml() -> str:
    """ChatML (``<|im_start|>role\\n...<|im_end|>``); tool turns keep impruver's role names."""
    return CHATML


# A registered template names its Ollama form with an ``ollama`` attribute (a plugin's template may too).
saiga.ollama = OLLAMA_SAIGA  # type: ignore[attr-defined]
zephyr.ollama = OLLAMA_ZEPHYR  # type: ignore[attr-defined]
chatml.ollama = OLLAMA_CHATML  # type: ignore[attr-defined]

# Tags transformers' chat-template environment adds for training (the spans of the assistant's turns); other
# Jinja implementations reject them ("unknown tag 'generation'").
TRAINING_ONLY_TAGS = ("generation", "endgeneration")
def portable_template(source: str) -> str:
    """The chat template without training-only tags, in a form any Jinja2 environment renders alike.

    transformers renders templates with ``trim_blocks`` and ``lstrip_blocks`` on; a plain ``jinja2.Environment()``
    (and minijinja's default) has them off. The template is lexed as transformers lexes it and written back
    from the lexer's tokens, whose text already has that whitespace removed; comments and the
    ``{% generation %}`` / ``{% endgeneration %}`` tags are left out. A newline that follows a block tag is
    written as an expression (``{{ '\\n' }}``), which ``trim_blocks`` leaves alone: the result renders the same
    text with and without those settings, so transformers renders it as it rendered the original.
    """
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    out: list[str] = []
    tag: list[tuple[str, str]] = []  # the tokens of the block tag being read
    after_block = False  # the last token written closes a block tag: trim_blocks would eat a newline after it
    for _, kind, value in env.lexer.tokeniter(source, None):
        if kind in ("comment_begin", "comment", "comment_end"):
            continue
        if kind == "block_begin" or tag:
            tag.append((kind, value))
            if kind == "block_end":
                names = [v for k, v in tag if k == "name"]
                if not (names and names[0] in TRAINING_ONLY_TAGS):
                    out.append("".join(v.rstrip() if k == "block_end" else v for k, v in tag))
                    after_block = True
                tag = []
            continue
        if kind == "data" and after_block and value.startswith("\n"):
            value = "{{ '\\n' }}" + value[1:]
        out.append(value.rstrip() if kind == "variable_end" else value)
        after_block = False
    return "".join(out)


def ollama_form(source: str, special: dict[str, str]) -> str | None:
    """The Ollama form of a registered template whose Jinja source is ``source`` (as registered, or in the portable
    form an output folder saves: :func:`portable_template`), its bos/eos filled from ``special``
    (``{"bos_token": "<s>", ...}``); None for any other template."""
    from impruver import registry

    plain = portable_template(source)
    for name in registry.names("templates"):
        factory = registry.lookup("templates", name)
        form = getattr(factory, "ollama", None)
        if form and portable_template(factory()) == plain:
            return str(form).replace("<<bos>>", special.get("bos_token") or "").replace(
                "<<eos>>", special.get("eos_token") or "")
    return None


def resolve_template(value: str, *, key: str = "tokenizer.chat_template") -> str:
    """Jinja source for a registered name, a ``.jinja`` file path, or inline Jinja source.

    Raises:
        ConfigError: an unknown name (listing the registered ones) or a missing file.
    """
    from impruver import registry

    if "{{" in value or "{%" in value:
        return value
    if value.endswith(".jinja"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError([Problem(key, f"no template file at {value}")])
        return path.read_text(encoding="utf-8")
    if not registry.has("templates", value):
        raise ConfigError([Problem(key, f"unknown template '{value}'; "
                                        f"{choices_hint(value, registry.names('templates'))}")])
    return registry.lookup("templates", value)()
