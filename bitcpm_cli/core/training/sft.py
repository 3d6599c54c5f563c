"""Supervised fine-tuning data: chat formats, rendering through the chat template, loss only on assistant turns.

Each conversation is rendered once with the tokenizer's chat template; the character span of every assistant turn
(its content and its end-of-turn token) is found by rendering the conversation's prefixes, and tokens whose
characters fall in a span are supervised. System and user tokens get label -100.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.model.chat import (
    CHATML_TOKENS,
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_TEMPLATE_SOURCE,
    check_chat_template,
    end_of_turn_ids,
    load_template,
    render_chat,
    set_chat_template,
    template_source,
)
from bitcpm_cli.core.training.chatdata import FORMATS, read_chat_data
from bitcpm_cli.core.training.recipe import TrainConfig

IGNORE = -100


@dataclass
class SftConfig(TrainConfig):
    """`bitcpm sft`: the training settings plus the chat-data ones."""

    max_length: int = 512
    packing: bool = False
    template: str | None = None  # auto (the tokenizer's, ChatML if none), chatml, or a .jinja file
    format: str = "auto"  # auto-detected per file, or alpaca / sharegpt / openai (messages)
    columns: list[str] = field(default_factory=list)  # dataset_info.json-style KEY=FIELD, or a dataset_info.json
    lr: float = 2e-5
    lr_scheduler: str = "constant"

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.max_length < 2:
            problems.append(f"max_length: must be at least 2, got {self.max_length}")
        if self.format not in FORMATS:
            problems.append(f"format: {self.format!r} is not one of {', '.join(FORMATS)}")
        return problems


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # packed sequences: positions restart at 0 for every example
    turns_cut: int = 0  # turns past max_length that were not rendered for masking (truncation drops them)

    @property
    def supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class SftData:
    examples: list[Example]
    summary: dict[str, Any] = field(default_factory=dict)


# ---- rendering and masking ---------------------------------------------------------------------------
def setup_chat_tokenizer(tokenizer: Any, template: str | None) -> list[str]:
    """Apply --template (ChatML when the tokenizer has none); add ChatML's special tokens when they are missing."""
    notes = []
    chosen = load_template(template)
    if chosen is not None:
        set_chat_template(tokenizer, chosen, template_source(template))
    elif not getattr(tokenizer, "chat_template", None):
        set_chat_template(tokenizer, DEFAULT_CHAT_TEMPLATE, DEFAULT_TEMPLATE_SOURCE)
        notes.append("the tokenizer has no chat template: using ChatML (<|im_start|>role ... <|im_end|>)")
    if tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE:
        missing = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
            notes.append(f"added {', '.join(missing)} to the tokenizer (the embeddings grow to match)")
    check_chat_template(tokenizer)  # a broken template fails here, before any data is rendered or model loaded
    if not tokenizer.is_fast:
        raise InputError("SFT masking needs a fast tokenizer (tokenizer.json)",
                         hint="convert the tokenizer with transformers' AutoTokenizer(use_fast=True) and save it")
    return notes


def encode_conversation(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                        max_length: int | None = None) -> Example | None:
    """Token ids and labels (assistant spans only); None when the conversation has no assistant turn.

    As in LLaMA-Factory, an assistant turn's target is everything the template renders for it after the generation
    prompt: its content (or tool calls), the end-of-turn token and the separator up to the next turn.
    With `max_length`, prefixes are rendered only until one reaches past the first max_length tokens (the labels of
    those tokens are exactly as without the cut; later turns are cut away by truncation, counted in `turns_cut`), so
    a very long conversation costs what its first max_length tokens do, not the square of its turns.
    """
    if not any(message["role"] == "assistant" for message in messages):
        return None
    render = lambda turns, prompt: render_chat(  # noqa: E731
        tokenizer, turns, tools=tools, add_generation_prompt=prompt)
    text = render(messages, False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    cut = offsets[max_length - 1][1] if max_length is not None and len(offsets) > max_length else len(text) + 1
    spans, turns_cut = [], 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:k], True)
        if len(before) >= cut:  # this turn starts after the tokens training keeps: so do all later ones
            turns_cut = len(messages) - k
            break
        through = render(messages[:k + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise InputError("the chat template does not render conversations as growing prefixes, so assistant "
                             "turns cannot be located", hint="use --template chatml or a prefix-consistent template")
        spans.append((len(before), len(through)))
    labels = [token if any(start < end_ and end > start_ for start_, end_ in spans) else IGNORE
              for token, (start, end) in zip(encoded["input_ids"], offsets)]
    return Example(encoded["input_ids"], labels, turns_cut=turns_cut)


def build_examples(config: SftConfig, tokenizer: Any) -> SftData:
    chat = read_chat_data(config.data, config.format, config.columns)
    conversations, formats = chat.conversations, chat.formats
    examples, no_assistant, truncated_away, truncated, turns_cut, cut_conversations = [], 0, 0, 0, 0, 0
    for conversation in conversations:
        example = encode_conversation(tokenizer, conversation.messages, conversation.tools, config.max_length)
        if example is None:
            no_assistant += 1
            continue
        turns_cut += example.turns_cut
        cut_conversations += bool(example.turns_cut)
        if len(example.input_ids) > config.max_length:
            truncated += 1
            example = Example(example.input_ids[:config.max_length], example.labels[:config.max_length])
            if not example.supervised:
                truncated_away += 1
                continue
        examples.append(example)
    if config.packing:
        examples = pack(examples, config.max_length)
    summary = {
        "files": formats, "conversations": len(conversations), "examples_used": len(conversations) - no_assistant
        - truncated_away, "skipped_no_assistant_turn": no_assistant, "dropped_by_truncation": truncated_away,
        "truncated": truncated, "sequences": len(examples), "packing": config.packing,
        "tokens": sum(len(e.input_ids) for e in examples), "supervised_tokens": sum(e.supervised for e in examples),
        "max_length": config.max_length, "skipped_abnormal": sum(chat.skipped.values()),
        "skipped_reasons": chat.skipped, "skipped_records": chat.skipped_where,
        "ignored_fields": chat.ignored_fields,
    }
    notes = [f"skipped {count} record(s): {reason} (as LLaMA-Factory skips them)"
             for reason, count in chat.skipped.items()]
    notes += skipped_notes(chat.skipped_where)
    if turns_cut:
        notes.append(f"{turns_cut} turn(s) in {cut_conversations} conversation(s) lie past max_length "
                     f"{config.max_length} tokens (from the first assistant turn starting there on): cut away with "
                     "the truncated tail, not rendered")
    summary["turns_cut"] = turns_cut
    notes += [f"field {name!r} is not used ({count} record(s))" for name, count in chat.ignored_fields.items()]
    summary["notes"] = notes
    if not examples:
        raise InputError("no usable training examples: " + ", ".join(
            f"{k.replace('_', ' ')} {v}" for k, v in summary.items() if k in ("conversations",
                                                                              "skipped_no_assistant_turn",
                                                                              "dropped_by_truncation",
                                                                              "skipped_abnormal")),
            hint="every example needs an assistant turn that survives --max-length truncation")
    return SftData(examples, summary)


SKIPPED_SHOWN = 10


def skipped_notes(places: list[str]) -> list[str]:
    """One note per skipped record (`file:line: reason`), the first SKIPPED_SHOWN of them, then a count of the rest
    (all are in the data summary's skipped_records)."""
    notes = [f"skipped: {place}" for place in places[:SKIPPED_SHOWN]]
    if len(places) > SKIPPED_SHOWN:
        notes.append(f"... and {len(places) - SKIPPED_SHOWN} more skipped record(s), every one listed with its "
                     "file:line in the data summary's skipped_records")
    return notes


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate whole examples, in order, into sequences of at most max_length tokens.

    Positions restart at 0 for every example: transformers' attention (eager, sdpa, flex, flash-varlen) reads the
    restarts as example boundaries when no attention mask is given, so no example attends to another
    (DataCollatorWithFlattening's convention). check_packing_isolation verifies this for the model being trained.
    """
    packed: list[Example] = []
    current = Example([], [], [])
    for example in examples:
        if current.input_ids and len(current.input_ids) + len(example.input_ids) > max_length:
            packed.append(current)
            current = Example([], [], [])
        current.input_ids += example.input_ids
        current.labels += example.labels
        current.position_ids += list(range(len(example.input_ids)))
    if current.input_ids:
        packed.append(current)
    return packed


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        item = {"input_ids": example.input_ids, "labels": example.labels}
        if example.position_ids is not None:
            item["position_ids"] = example.position_ids
        return item


def collate(pad_id: int):
    """Pad to the longest sequence; packed sequences get position ids and no attention mask (padding is one more
    example of its own, with label -100), unpacked ones an attention mask."""
    def collator(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        ids = [item["input_ids"] + [pad_id] * (width - len(item["input_ids"])) for item in batch]
        labels = [item["labels"] + [IGNORE] * (width - len(item["labels"])) for item in batch]
        if "position_ids" in batch[0]:
            positions = [item["position_ids"] + list(range(width - len(item["position_ids"]))) for item in batch]
            return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                    "position_ids": torch.tensor(positions)}
        mask = [[1] * len(item["input_ids"]) + [0] * (width - len(item["input_ids"])) for item in batch]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}

    return collator


def check_packing_isolation(model: Any) -> None:
    """Refuse --packing unless this model keeps packed examples apart: the logits of an example packed after another
    must equal its logits alone (attention implementations that ignore position-id boundaries fail this). Training
    runs without a KV cache (the Trainer sets use_cache=False), as here: transformers reads packing only then."""
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, model.config.vocab_size, (1, n), generator=generator) for n in (7, 5))
    positions = torch.tensor([list(range(7)) + list(range(5))])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=second.to(parameter.device), use_cache=False).logits.float()
            packed = model(input_ids=torch.cat([first, second], 1).to(parameter.device),
                           position_ids=positions.to(parameter.device), use_cache=False).logits[:, 7:].float()
    finally:
        model.train(was_training)
    if not torch.allclose(alone, packed, atol=2e-3, rtol=1e-3):
        implementation = getattr(model.config, "_attn_implementation", None) or "unknown"
        raise InputError(f"--packing: this model ({type(model).__name__}, attention {implementation}) lets packed "
                         "examples attend to each other (position-id boundaries are ignored)",
                         hint="train with --no-packing, or use a transformers model class with sdpa, eager or "
                              "flash attention")


class PackingIsolationCheck(TrainerCallback):
    """Runs check_packing_isolation on the model being trained, before the first step."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        check_packing_isolation(model)


def sft_data(config: SftConfig, tokenizer: Any):
    """The `data` hook of core.training.train.train for chat data."""
    from bitcpm_cli.core.training.data import DataPlan

    notes = setup_chat_tokenizer(tokenizer, config.template)
    data = build_examples(config, tokenizer)
    data.summary["notes"] = notes + data.summary["notes"]
    average = data.summary["tokens"] // max(len(data.examples), 1)
    return DataPlan(ExampleDataset(data.examples), collate(tokenizer.pad_token_id), data.summary,
                    tokens_per_sample=average)


def write_chat_generation_config(folder: Path, tokenizer: Any) -> None:
    """Generation of a chat reply stops at the template's end-of-turn token too (train's `extra_files` hook)."""
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    eos = config.get("eos_token_id", tokenizer.eos_token_id)
    eos = eos if isinstance(eos, list) else [eos]
    config["eos_token_id"] = sorted({e for e in eos + end_of_turn_ids(tokenizer) if e is not None})
    path.write_text(json.dumps(config, indent=2) + "\n")


def fine_tune(config: SftConfig, on_event=None, callbacks: list[Any] = ()):
    """`bitcpm sft`: the training stack of `bitcpm train` with chat data and assistant-only loss."""
    from bitcpm_cli.core.training.train import train

    checks = [PackingIsolationCheck()] if config.packing else []
    return train(config, data=sft_data, on_event=on_event, callbacks=checks + list(callbacks),
                 extra_files=write_chat_generation_config)


@dataclass
class PreviewExample:
    segments: list[tuple[str, bool]]  # (text, supervised)
    tokens: int
    supervised_tokens: int


def preview(config: SftConfig, tokenizer: Any, count: int) -> tuple[list[PreviewExample], dict[str, Any], list[str]]:
    """The first `count` training sequences as text runs marked supervised or not, without loading the model."""
    notes = setup_chat_tokenizer(tokenizer, config.template)
    data = build_examples(config, tokenizer)
    shown = []
    for example in data.examples[:count]:
        segments: list[tuple[str, bool]] = []
        run: list[int] = []
        flag = None
        for token, label in zip(example.input_ids, example.labels):
            supervised = label != IGNORE
            if flag is not None and supervised != flag:
                segments.append((tokenizer.decode(run), flag))
                run = []
            run.append(token)
            flag = supervised
        if run:
            segments.append((tokenizer.decode(run), bool(flag)))
        shown.append(PreviewExample(segments, len(example.input_ids), example.supervised))
    return shown, data.summary, notes + data.summary["notes"]
