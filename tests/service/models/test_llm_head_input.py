"""HFCausalLM hands the LM head a contiguous input: with `logits_to_keep=1` HF slices the last position out of
the hidden states, and in bf16 on the CPU that strided view made `F.linear` copy the vocabulary matrix once per
row of the batch (a 32-question prefill 12× slower than with the fix)."""

from __future__ import annotations

import torch

from service.models.llm import HFCausalLM


def test_lm_head_gets_a_contiguous_last_position_and_the_same_logits(llm: HFCausalLM):
    seen = []
    head = llm.model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    ids, mask = llm.encode(["first question here?", "a second, longer question about something?"])  # (2, n)
    try:
        with torch.inference_mode():
            last = llm.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]  # (2, V)
            full = llm.model(input_ids=ids, attention_mask=mask).logits[:, -1]  # (2, V)
    finally:
        handle.remove()
    assert seen == [True, True]
    assert torch.allclose(last, full, atol=1e-5, rtol=1e-4)
