"""Where every tensor lives, proven without a GPU: the towers on fake cuda:0 / cuda:1 devices,
with every device-changing copy counted."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import alexnet2gpu.model.alexnet
from alexnet2gpu import AlexNet2GPU, AlexNetConfig
from alexnet2gpu.model.exchanges import CopyCounter, counted_forward_bytes, exchanges

A, B = "cuda:0", "cuda:1"


def expected_moves(n: int, classes: int, size: int = 224, lrn_halo: bool = False, split: bool = False) -> Counter:
    """Every copy between devices: into conv3, fc6 and fc7 both ways; into fc8 both ways where it is split
    (P's Figure 2), or tower B's fc7 outputs one way to tower A's one fc8 (K12's, the default)."""
    exchanged = [(n, 128, 13, 13), (n, 4608), (n, 2048)] + ([(n, 2048)] if split else [])
    if lrn_halo:  # Caffe's LRN across the towers: 2 edge channels at LRN1 and LRN2, not in P
        exchanged = [(n, 2, 55, 55), (n, 2, 27, 27), *exchanged]
    moves = [("cpu", A, (n, 3, size, size)), ("cpu", B, (n, 3, size, size))]  # the batch, once per tower
    moves += [m for shape in exchanged for m in ((A, B, shape), (B, A, shape))]
    if split:
        moves.append((B, A, (n, classes // 2)))  # tower B's logits gathered on device 0
    else:
        moves.append((B, A, (n, 2048)))  # tower B's fc7 outputs into fc8 on tower A
    return Counter(moves)


def copy_nodes(output: torch.Tensor) -> Counter:
    """(from, to) of every ToCopyBackward0 in the backward graph: it takes the gradient on the
    forward copy's output device and hands it back to the device the forward copy read from."""
    found, seen, stack = Counter(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
        if type(node).__name__ == "ToCopyBackward0":
            source = node.next_functions[0][0]
            found[(str(source._input_metadata[0].device), str(node._input_metadata[0].device))] += 1
    return found


@pytest.fixture
def fake_mode():
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def test_towers_are_built_on_their_devices(fake_mode) -> None:
    model = AlexNet2GPU(AlexNetConfig(), devices=(A, B))
    assert {str(p.device) for p in model.tower_a.parameters()} == {A}
    assert {str(p.device) for p in model.tower_b.parameters()} == {B}
    assert [str(d) for d in model.devices] == [A, B]


@pytest.mark.parametrize("split", [False, True], ids=["k12", "split-fc8"])
def test_only_the_exchanges_cross_devices(fake_mode, split: bool) -> None:
    model = AlexNet2GPU(AlexNetConfig(num_classes=1000, fc8_split=split), devices=(A, B))
    with CopyCounter() as counter:
        logits = model(torch.randn(4, 3, 224, 224, requires_grad=True))
    assert str(logits.device) == A and logits.shape == (4, 1000)
    assert Counter(m[:3] for m in counter.moves) == expected_moves(4, 1000, split=split)
    assert len(counter.moves) == 2 + (4 if split else 3) * 2 + 1


@pytest.mark.parametrize(("split", "a_to_b", "b_to_a"), [(False, 3, 4), (True, 4, 5)], ids=["k12", "split-fc8"])
def test_backward_graph_mirrors_every_copy(fake_mode, split: bool, a_to_b: int, b_to_a: int) -> None:
    model = AlexNet2GPU(AlexNetConfig(num_classes=10, fc8_split=split), devices=(A, B))
    logits = model(torch.randn(2, 3, 224, 224, requires_grad=True))
    forward = Counter((src, dst) for src, dst, _ in expected_moves(2, 10, split=split).elements())
    assert copy_nodes(logits) == forward  # each backward copy node moves a gradient dst -> src
    assert forward == Counter({(A, B): a_to_b, (B, A): b_to_a, ("cpu", A): 1, ("cpu", B): 1})


def test_fc8_on_tower_a_sends_tower_b_activations_one_way(fake_mode) -> None:
    model = AlexNet2GPU(AlexNetConfig(num_classes=10, fc8_split=False), devices=(A, B))
    with CopyCounter() as counter:
        model(torch.randn(2, 3, 224, 224))
    moves = [m[:3] for m in counter.moves]
    assert len(moves) == 2 + 3 * 2 + 1  # fc8's input goes one way only, and there are no logits to gather
    # (N, 2048) moves: fc6's outputs both ways into fc7, fc7's outputs only from B to A
    assert moves.count((A, B, (2, 2048))) == 1 and moves.count((B, A, (2, 2048))) == 2


@pytest.mark.parametrize(
    ("split", "broken"), [(True, point) for point in range(4)] + [(False, point) for point in range(3)]
)
def test_a_missing_exchange_is_a_device_mismatch(fake_mode, monkeypatch, split: bool, broken: int) -> None:
    """Skip the move at one exchange point (conv3, fc6, fc7, and fc8 where it is split): the concatenation
    then mixes cuda:0 and cuda:1 tensors, which fails instead of silently running on one device."""
    real, calls = alexnet2gpu.model.alexnet.exchange, []

    def exchange(a: torch.Tensor, b: torch.Tensor):
        calls.append(len(calls))
        if len(calls) - 1 == broken:
            return torch.cat([a, b], dim=1), torch.cat([a, b], dim=1)
        return real(a, b)

    monkeypatch.setattr(alexnet2gpu.model.alexnet, "exchange", exchange)
    model = AlexNet2GPU(AlexNetConfig(num_classes=10, fc8_split=split), devices=(A, B))
    with pytest.raises(RuntimeError, match="cuda:0.*cuda:1|cuda:1.*cuda:0"):
        model(torch.randn(2, 3, 224, 224))
    assert len(calls) == broken + 1


def test_one_device_fallback_moves_only_the_input(fake_mode) -> None:
    model = AlexNet2GPU(AlexNetConfig(num_classes=10), devices=(A, A))
    with CopyCounter() as counter:
        model(torch.randn(2, 3, 224, 224))
    assert [m[:3] for m in counter.moves] == [("cpu", A, (2, 3, 224, 224))]


def test_caffe_lrn_across_towers_adds_a_halo_at_lrn1_and_lrn2(fake_mode) -> None:
    """lrn_scope="all" (Caffe's): besides the paper's moves, 2 edge channels each way at LRN1 (55x55)
    and LRN2 (27x27), and no others."""
    model = AlexNet2GPU(AlexNetConfig.caffe(num_classes=10), devices=(A, B))
    with CopyCounter() as counter:
        model(torch.randn(2, 3, 227, 227))
    assert Counter(m[:3] for m in counter.moves) == expected_moves(2, 10, size=227, lrn_halo=True, split=True)


CONFIGS = [AlexNetConfig(), AlexNetConfig(num_classes=10, fc8_split=False), AlexNetConfig.caffe(num_classes=10)]


@pytest.mark.parametrize("config", CONFIGS)
def test_exchange_accounting_matches_a_counted_run(config: AlexNetConfig) -> None:
    computed = sum(row.forward_bytes() for row in exchanges(config))
    assert counted_forward_bytes(config) == computed
    halo = 2 * 2 * (55 * 55 + 27 * 27) if config.lrn_scope == "all" else 0  # 2 channels each way, 2 LRNs
    logits = config.fc8_out[1] if config.fc8_split else 0
    fc8_input = 0 if config.fc8_split else 2048  # one way only: to fc8 on tower A
    assert computed == 4 * (halo + 2 * (128 * 13 * 13 + 128 * 6 * 6 + 2048 + 2048) + logits - fc8_input)
