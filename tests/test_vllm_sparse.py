"""Both S2FT formulations of vllm_ext.sparse against a dense per-token reference: several slots, padded index tables,
base-model rows (slot -1) in a batch that fills every slot, on CPU tensors (the punica one is the GPU path); the CPU
one in both its branches (balanced batch: padded bmm; skewed batch: grouped GEMM)."""

import pytest
import torch

NUM_SLOTS, K_MAX, WIDTH, OUT = 3, 8, 16, 24
BATCHES = {  # every slot in use: vLLM's CPU ops would give base rows the last slot
    "balanced": (2, -1, 0, 1, 2, -1, 1, 1, 0),
    "skewed": (1, 1, -1, 1, 0, 1, 1, 2, 1, 1, -1),
}


def _adapters(axis_size, k_of_slot, side, generator):
    """Per slot: k distinct positions on the indexed axis and the delta, (out, k) input side / (k, in) output side."""
    adapters = []
    for k in k_of_slot:
        indices = torch.randperm(axis_size, generator=generator)[:k]
        shape = (OUT, k) if side == "input" else (k, WIDTH)
        adapters.append((indices, torch.randn(shape, generator=generator, dtype=torch.float64).float()))
    return adapters


def _tables(adapters, side, grouped):
    """(index table padded with position 0, deltas zero where padded) in the layout of each formulation."""
    index = torch.zeros(NUM_SLOTS, K_MAX, dtype=torch.long)
    shape = (OUT, K_MAX) if side == "input" else (K_MAX, WIDTH)  # each slot: the adapter's own layout
    delta = torch.zeros(NUM_SLOTS, *shape) if grouped else torch.zeros(NUM_SLOTS, 1, *shape)
    for slot, (indices, d) in enumerate(adapters):
        k = indices.numel()
        index[slot, :k] = indices
        slot_delta = delta[slot] if grouped else delta[slot, 0]
        (slot_delta[:, :k] if side == "input" else slot_delta[:k]).copy_(d)
    return index, delta


def _wrappers(slots):
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from vllm_ext.punica import S2FTPunicaWrapperCPU

    ids = tuple(slot + 1 if slot >= 0 else 0 for slot in slots)
    mapping = LoRAMapping(index_mapping=ids, prompt_mapping=ids, is_prefill=True)
    wrappers = []
    for cls in (PunicaWrapperCPU, S2FTPunicaWrapperCPU):  # vLLM's own (base rows misrouted) and the plugin's
        wrapper = cls(max_num_batched_tokens=16, max_batches=16, device="cpu")
        wrapper.update_metadata(mapping, [1, 2, 3], NUM_SLOTS + 1, 32)
        wrappers.append(wrapper)
    return wrappers


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("side", ["input", "output"])
def test_formulations_match_a_dense_reference(side, batch):
    from vllm_ext import sparse

    generator = torch.Generator().manual_seed(0)
    offset = 5  # output side: the slice starts at this column of the packed output
    axis_size = WIDTH if side == "input" else OUT - offset
    adapters = _adapters(axis_size, (K_MAX, 3, 5), side, generator)  # slots 1 and 2 are padded
    slot_of_row = BATCHES[batch]
    x = torch.randn(len(slot_of_row), WIDTH, generator=generator)
    base = torch.randn(len(slot_of_row), OUT, generator=generator)

    expected = base.clone()
    for row, slot in enumerate(slot_of_row):
        if slot >= 0:
            indices, delta = adapters[slot]
            if side == "input":
                expected[row] += delta @ x[row, indices]
            else:
                expected[row, offset + indices] += delta @ x[row]

    slots = torch.tensor(slot_of_row)
    index, delta = _tables(adapters, side, grouped=False)
    for wrapper in _wrappers(slot_of_row):
        output = base.clone()
        if side == "input":
            got = sparse.add_input_side_punica(wrapper, output, x, slots, index, delta)
        else:
            got = sparse.add_output_side_punica(wrapper, output, x, slots, index, delta, offset)
        torch.testing.assert_close(got, expected)
        assert torch.equal(got[slots < 0], base[slots < 0])  # base rows: exactly the base output

    index, delta = _tables(adapters, side, grouped=True)
    groups = sparse.group_tokens(slots, NUM_SLOTS, frozenset(range(NUM_SLOTS)))
    assert (groups.padded is not None) == (batch == "balanced")
    output = base.clone()
    if side == "input":
        got = sparse.add_input_side_grouped(output, x, groups, index, delta)
    else:
        got = sparse.add_output_side_grouped(output, x, groups, index, delta, offset)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got[slots < 0], base[slots < 0])


def test_stale_slots_past_the_batch_count_as_base_rows():
    from vllm_ext.sparse import slot_mask

    safe, valid = slot_mask(torch.tensor([1, -1, 7, -5, 0]), 3)  # CUDA-graph padding rows may hold anything
    assert safe.tolist() == [1, 0, 0, 0, 0] and valid.tolist() == [True, False, False, False, True]
