"""Prompt templates: how a dataset's `prompt` column becomes the text a model is asked to continue.

Templates are named strings (``template: r1_zero`` in a recipe):

- ``r1_zero``: the DeepSeek-R1-Zero template (DeepSeek-AI 2025, Table 1), plain text, no chat template.
  The model reasons inside ``<think> </think>`` and answers inside ``<answer> </answer>``.
- ``chat``: the tokenizer's own chat template with one user turn and the generation prompt.
- ``plain``: the prompt as it is.

>>> render_prompt("What is 2 + 3?", "plain")
'What is 2 + 3?'
"""

from __future__ import annotations

from typing import Any

from rlkit.errors import RlkitError, first_line

R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {prompt}\nAssistant:"
)

TEMPLATES = ("r1_zero", "chat", "plain")


class TemplateError(RlkitError):
    """A prompt that the chosen template cannot render."""


class NoTemplate(TemplateError):
    """The template cannot render any prompt (it does not exist, or the tokenizer has no chat template)."""


def completion_text(completion: str, template: str) -> str:
    """The completion as it follows a rendered prompt: after R1-Zero's "Assistant:" it starts with a space.

    >>> completion_text("<think> x </think>", "r1_zero")
    ' <think> x </think>'
    """
    if template == "r1_zero" and not completion.startswith((" ", "\n")):
        return " " + completion
    return completion


def full_text(prompt: str, completion: str, template: str, tokenizer) -> str:
    """Prompt and completion as one training text: a chat conversation, or the rendered prompt, the
    completion and EOS (what TRL's trainers see for non-conversational data)."""
    if template == "chat":
        return apply_chat(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                          generation_prompt=False)
    return render_prompt(prompt, template, tokenizer) + completion_text(completion, template) + tokenizer.eos_token


def apply_chat(tokenizer, messages: list[dict], generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
    """``messages`` through the tokenizer's chat template; a tokenizer without one, or a template that
    refuses the conversation (Gemma's refuses a system turn; some want user and assistant to alternate),
    is a one-line :class:`TemplateError` that says what it refused."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise NoTemplate(f"template chat (data.template or eval.template): {name}'s tokenizer has no chat template; "
                            "use r1_zero or plain, or a model that has one")
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2's TemplateError from the template's raise_exception(), or a bad template
        roles = ", ".join(m.get("role", "?") for m in messages)
        hint = " (drop data.system_prompt, or put it in the user turn)" if messages[0].get("role") == "system" else ""
        raise TemplateError(f"the chat template of {getattr(tokenizer, 'name_or_path', 'the model')} refused the "
                            f"conversation [{roles}]: {first_line(e)}{hint}") from None


def render_prompt(prompt: str | list[dict], template: str, tokenizer: Any = None, tools: list[dict] | None = None) -> str:
    """Render one prompt with the named template; ``chat`` needs a tokenizer with a chat template. A
    conversational prompt (a list of ``{role, content}`` messages, TRL's format) goes through the chat
    template as it is. ``tools`` (JSON schemas) go to the chat template (``tools=``)."""
    if isinstance(prompt, list):
        if template != "chat":
            raise TemplateError(f"a conversational prompt (a list of messages) needs data.template chat, not "
                                f"'{template}'")
        return apply_chat(tokenizer, prompt, tools=tools)
    if template == "r1_zero":
        return R1_ZERO.format(prompt=prompt)
    if template == "plain":
        return prompt
    if template == "chat":
        return apply_chat(tokenizer, [{"role": "user", "content": prompt}], tools=tools)
    raise NoTemplate(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")


def render_rows(prompts: list, template: str, tokenizer, spec: str, tools: list[dict] | None = None) -> list[str]:
    """Every prompt of a data set rendered; a template error names the data set and its row (1-based) unless
    it is the same for every row (no chat template at all)."""
    out = []
    for i, p in enumerate(prompts, 1):
        try:
            out.append(render_prompt(p, template, tokenizer, tools))
        except NoTemplate:
            raise
        except TemplateError as e:
            raise TemplateError(f"{spec}: row {i}: {e}") from None
    return out



def conversation_tokens(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """A whole conversation's token ids and a mask that is 1 on the assistant turns' tokens only (their text and
    end-of-turn token as the chat template writes them; never a user, system or tool turn, nor the role headers).
    Each assistant turn's characters are found by rendering the conversation up to it (with the generation prompt)
    and through it; a template that renders earlier turns differently once later ones follow (Qwen3 drops old
    ``<think>`` blocks) cannot be split this way: TemplateError."""
    full = apply_chat(tokenizer, messages, generation_prompt=False, tools=tools)
    spans = []
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = apply_chat(tokenizer, messages[:k], generation_prompt=True, tools=tools) if k else ""
        through = apply_chat(tokenizer, messages[: k + 1], generation_prompt=False, tools=tools)
        if not (full.startswith(through) and through.startswith(before)):
            raise TemplateError(f"the chat template of {getattr(tokenizer, 'name_or_path', 'the model')} renders earlier "
                                "turns differently once later ones follow, so its assistant turns cannot be told "
                                "apart for training; use a template that keeps earlier turns as they are")
        spans.append((len(before), len(through.rstrip("\n"))))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= s and e <= b and e > s for a, b in spans)) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], mask
