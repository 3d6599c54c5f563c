"""Packed SFT batches: positions restart per example and no example attends to another."""

import pytest
import torch

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.training.sft import IGNORE, Example, ExampleDataset, check_packing_isolation, collate, pack

from tests.conftest import tiny_llama_config


def examples():
    torch.manual_seed(1)
    made = []
    for length in (9, 6, 11, 4, 8):
        ids = torch.randint(4, 96, (length,)).tolist()
        labels = [IGNORE] * (length // 2) + ids[length // 2:]
        made.append(Example(ids, labels))
    return made


def per_example_losses(model, batch, segments):
    """Summed token loss of each example, from one forward of `batch` (segments: (row, start, end))."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits  # as in training
    losses = []
    for row, start, end in segments:
        shift_logits, shift_labels = logits[row, start:end - 1], batch["labels"][row, start + 1:end]
        losses.append(torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE,
                                                        reduction="sum"))
    return torch.stack(losses)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batch_gives_the_same_per_example_losses(attention):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(attn_implementation=attention)).eval()
    single = examples()
    packed = pack(single, max_length=20)
    assert [len(p.input_ids) for p in packed] == [15, 15, 8]
    assert packed[0].position_ids == list(range(9)) + list(range(6))
    batch = collate(pad_id=3)([ExampleDataset(packed)[i] for i in range(len(packed))])
    assert "attention_mask" not in batch and batch["position_ids"][2].tolist() == list(range(8)) + list(range(7))
    segments, index = [], 0
    for row, sequence in enumerate(packed):
        start = 0
        while start < len(sequence.input_ids):
            end = start + len(single[index].input_ids)
            segments.append((row, start, end))
            start, index = end, index + 1
    with torch.no_grad():
        together = per_example_losses(model, batch, segments)
        alone = torch.cat([per_example_losses(model, collate(3)([{"input_ids": e.input_ids, "labels": e.labels}]),
                                              [(0, 0, len(e.input_ids))]) for e in single])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    check_packing_isolation(model)  # passes: nothing raised


def test_packing_refused_for_a_model_that_mixes_examples():
    from transformers import LlamaForCausalLM

    class IgnoresPositions(LlamaForCausalLM):  # a model whose attention cannot see example boundaries
        def forward(self, input_ids=None, position_ids=None, **kwargs):
            return super().forward(input_ids=input_ids, **kwargs)

    model = IgnoresPositions(tiny_llama_config())
    with pytest.raises(InputError, match="--packing: this model .* lets packed examples attend to each other"):
        check_packing_isolation(model)
