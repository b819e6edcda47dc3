"""Prompt profiles: how one frozen LLM is asked a question, with or without documents in its prompt.

A profile is a property of the LLM, not of the code: the same words that make one LLM answer with a
short span make another ramble (SmolLM2-135M-Instruct through its chat template answers SQuAD with
whole sentences: F1 15.4; as a plain transcript with two short examples: F1 30.3, docs/DESIGN.md §3).
The trainer records the profile in the checkpoint (`PromptProfile.to_dict`), so the service, the
evaluation and training all ask the LLM the same way.

- `question_prompt(q)`: what follows the memory prefix (CMT) or stands alone (no memory).
- `context_prompt(q, docs)`: the documents as raw text, then the question (gold / RAG rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from service.errors import InvalidInputError


@dataclass(frozen=True)
class ShotExample:
    """One worked example shown before the real question (few-shot)."""

    question: str
    answer: str
    context: str = ""
    """Shown only in context prompts (gold / RAG rows); question prompts show question and answer."""


@dataclass(frozen=True)
class PromptProfile:
    name: str
    """Short name, recorded in checkpoints and reports."""
    question_template: str = "Question: {question}\nAnswer:"
    """One question; must contain {question}. The answer is generated right after it."""
    context_template: str = "Document: {context}\nQuestion: {question}\nAnswer:"
    """Documents then a question; must contain {context} and {question}."""
    document_separator: str = "\n"
    """Joins several documents (RAG top-3) into {context}."""
    shots: tuple[ShotExample, ...] = ()
    """Worked examples put before the real question, each rendered with the same template."""
    shot_separator: str = "\n\n"
    """Between one rendered example (with its answer) and the next block."""
    shots_in_question_prompt: bool = True
    """Show the shots before a question alone too (no memory, CMT). False keeps that prompt short:
    training teaches the memory path the answer format, and every prompt token costs each step."""
    chat: bool = False
    """Wrap the rendered prompt as the user turn of the tokenizer's chat template."""
    stop_strings: tuple[str, ...] = ("\n",)
    """Generation stops at the first of these: one line is one answer."""

    def __post_init__(self) -> None:
        if "{question}" not in self.question_template:
            raise InvalidInputError(f"PromptProfile {self.name!r}: question_template needs {{question}}")
        if "{question}" not in self.context_template or "{context}" not in self.context_template:
            raise InvalidInputError(f"PromptProfile {self.name!r}: context_template needs {{context}} and {{question}}")

    # ---- rendering ------------------------------------------------------------------------------

    def _with_shots(self, body: str, render_shot) -> str:
        shots = [render_shot(s) + " " + s.answer for s in self.shots]
        return self.shot_separator.join([*shots, body])

    def question_prompt(self, question: str) -> str:
        """The prompt of a question alone (no memory, or after the CMT prefix)."""
        if not self.shots_in_question_prompt:
            return self.question_template.format(question=question)
        return self._with_shots(
            self.question_template.format(question=question),
            lambda s: self.question_template.format(question=s.question),
        )

    def context_prompt(self, question: str, documents: Sequence[str]) -> str:
        """The prompt with documents as raw text (gold document or RAG top-k)."""
        if isinstance(documents, str):
            documents = [documents]
        body = self.context_template.format(context=self.document_separator.join(documents), question=question)
        return self._with_shots(
            body, lambda s: self.context_template.format(context=s.context or "", question=s.question)
        )

    def wrap(self, tokenizer: Any, prompt: str) -> str:
        """The text the LLM reads: the prompt itself, or its chat-template user turn."""
        if not self.chat:
            return prompt
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInputError(f"prompt profile {self.name!r} needs a chat template; this tokenizer has none")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def question_text(self, tokenizer: Any, question: str) -> str:
        """What the LLM reads for a question alone: question_prompt, wrapped."""
        return self.wrap(tokenizer, self.question_prompt(question))

    def context_text(self, tokenizer: Any, question: str, documents: Sequence[str]) -> str:
        """What the LLM reads with documents in its prompt: context_prompt, wrapped."""
        return self.wrap(tokenizer, self.context_prompt(question, documents))

    # ---- (de)serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptProfile:
        data = dict(data)
        data["shots"] = tuple(ShotExample(**s) for s in data.get("shots", ()))
        data["stop_strings"] = tuple(data.get("stop_strings", ("\n",)))
        return cls(**data)


# Two short SQuAD-style examples: they teach the answer format (a short span, one line), not facts.
_SHOTS = (
    ShotExample(
        context=(
            "The Eiffel Tower was built for the 1889 World's Fair in Paris and was designed by "
            "Gustave Eiffel's company."
        ),
        question="When was the Eiffel Tower built?",
        answer="1889",
    ),
    ShotExample(
        context="Marie Curie shared the 1903 Nobel Prize in Physics with Pierre Curie and Henri Becquerel.",
        question="Who shared the 1903 Nobel Prize in Physics with Marie Curie?",
        answer="Pierre Curie and Henri Becquerel",
    ),
)

PROFILES: dict[str, PromptProfile] = {
    p.name: p
    for p in (
        # What the in-house base LLMs (trainer.base_llm) were trained to read.
        PromptProfile(name="plain"),
        # A plain transcript with two short examples: pretrained instruct models answer with a span.
        PromptProfile(
            name="fewshot",
            question_template="Question: {question}\nAnswer:",
            context_template="Context: {context}\nQuestion: {question}\nAnswer:",
            shots=_SHOTS,
        ),
        # The same, with the question alone asked without shots: what CMT is trained on (a short prompt
        # after the memory prefix); the gold / RAG rows still read the shots.
        PromptProfile(
            name="fewshot-context",
            question_template="Question: {question}\nAnswer:",
            context_template="Context: {context}\nQuestion: {question}\nAnswer:",
            shots=_SHOTS,
            shots_in_question_prompt=False,
        ),
        # The LLM's own chat template, zero-shot (what a chat user would type).
        PromptProfile(
            name="chat",
            question_template="Answer with a short phrase.\nQuestion: {question}",
            context_template="Answer with a short phrase from the context.\nContext: {context}\nQuestion: {question}",
            chat=True,
            stop_strings=("\n",),
        ),
    )
}
DEFAULT_PROFILE = "plain"
"""Profile of checkpoints written before profiles existed (they were trained on the plain template)."""


def get_profile(name_or_dict: str | dict[str, Any] | PromptProfile | None) -> PromptProfile:
    """A profile by name, from a checkpoint's dict, or the default for None."""
    if isinstance(name_or_dict, PromptProfile):
        return name_or_dict
    if name_or_dict is None:
        return PROFILES[DEFAULT_PROFILE]
    if isinstance(name_or_dict, dict):
        return PromptProfile.from_dict(name_or_dict)
    if name_or_dict not in PROFILES:
        raise InvalidInputError(f"unknown prompt profile {name_or_dict!r}; known: {sorted(PROFILES)}")
    return PROFILES[name_or_dict]
