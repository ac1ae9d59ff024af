"""The EoRA start on several ranks: each layer's factorisations split among the ranks by cost,
Hessians summed on their owners only, every start broadcast — against one rank (gloo, CPU)."""

from __future__ import annotations

import itertools
import types

import pytest
import torch
from conftest import spawn_ranks
from torch import nn

from fabricq.quant.gptq import rtn_quantize
from fabricq.quant.grid import QuantScheme
from fabricq.recovery import eora

# A tiny decoder with a Llama layer's structure (q/k/v read one input, gate/up another; k/v
# narrower, down wider), written here so that neither process imports transformers.
HIDDEN, INTER, KV, VOCAB, LAYERS = 64, 160, 32, 96, 2


class TinyLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(HIDDEN, HIDDEN, bias=False), nn.Linear(
            HIDDEN, KV, bias=False), nn.Linear(HIDDEN, KV, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(HIDDEN, INTER, bias=False), nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        h = torch.nn.functional.rms_norm(x, (HIDDEN,))
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        scores = (q[..., :KV] @ k.transpose(-1, -2)).tril() / KV**0.5  # causal, unnormalised: a mixing
        x = x + self.o_proj(torch.cat([scores.softmax(-1) @ v, q[..., KV:]], dim=-1))
        h = torch.nn.functional.rms_norm(x, (HIDDEN,))
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(TinyLayer() for _ in range(LAYERS))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = TinyDecoder()

    def get_decoder(self):
        return self.model

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.model(input_ids, attention_mask, use_cache)


def _tiny_student():
    """The tiny model (seeded) with LoRA adapters over a W4 round-to-nearest base of every
    Linear; returns (model, adapters, original weights)."""
    from fabricq.recovery.lora import attach_lora

    torch.manual_seed(0)
    model = TinyModel().eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    original = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    quantized = {n: rtn_quantize(w, QuantScheme(4, 32, True, "none")) for n, w in original.items()}
    lora = attach_lora(model, quantized, names, rank=4, alpha=8, mode="lora")
    return model, lora, original


def _windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))


def _alternating_owners(groups, shapes, world_size):
    """Owners that split every shared-input group (q, v, gate, down on rank 0; k, o, up on 1): the
    groups' Hessians then reach every rank and each rank factorises its members only."""
    names = [n for group in groups for n in group]
    return {n: i % world_size for i, n in enumerate(names)}


PLANS = {"by_cost": eora.plan_owners, "groups_split": _alternating_owners}


def _rank_main(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from fabricq.recovery.evaluation import rank_reducer as _reducer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        solve, results = eora.eora_factors, {}
        for plan, owners in PLANS.items():
            factorised = []

            def counting(error, *args, factorised=factorised, **kwargs):  # which modules this rank factorises
                factorised.append(error.double().norm().item())
                return solve(error, *args, **kwargs)

            eora.eora_factors, eora.plan_owners = counting, owners
            model, lora, original = _tiny_student()
            fabric = types.SimpleNamespace(world_size=world, global_rank=rank, device=torch.device("cpu"))
            stats = eora.initialize(model, lora, original, _windows().tensor_split(world)[rank], batch_size=2,
                                    device="cpu", reduce=_reducer(fabric), rank=rank, world_size=world)
            results[plan] = {"delta": {n: m.delta_weight() for n, m in lora.items()},
                             "factors": {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone())
                                         for n, m in lora.items()},
                             "stats": stats, "factorised": factorised}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_starts(tmp_path_factory):
    return spawn_ranks(_rank_main, tmp_path_factory.mktemp("eora_ranks"))


@pytest.mark.parametrize("plan", list(PLANS))
def test_two_ranks_give_one_ranks_eora_start(two_rank_starts, plan):
    """Every rank ends with the one-rank start of every module (B·A within float tolerance: the
    Hessians are summed in another order) and the same error statistics, whether each group has
    one owner (its Hessian summed on that rank only) or several (summed on every rank)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, lora, original = _tiny_student()
        stats = eora.initialize(model, lora, original, _windows(), batch_size=2, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert len(stats) == len(lora) == 14
    for ranks in two_rank_starts:
        got = ranks[plan]
        assert list(got["stats"]) == list(stats)
        for name, module in lora.items():
            expected = module.delta_weight()
            assert expected.abs().max() > 1e-3, name  # a real correction, not the zero start
            torch.testing.assert_close(got["delta"][name], expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
            for key in ("error_before", "error_after"):
                assert got["stats"][name][key] == pytest.approx(stats[name][key], rel=1e-5), (name, key)
    # Both ranks hold the very same adapters (broadcast from the owner, not recomputed).
    for name in lora:
        for a, b in zip(two_rank_starts[0][plan]["factors"][name], two_rank_starts[1][plan]["factors"][name]):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("plan", list(PLANS))
def test_two_ranks_split_the_factorisations(two_rank_starts, plan):
    """Each module is factorised on exactly one rank, and both ranks take a share of every layer."""
    done = [r[plan]["factorised"] for r in two_rank_starts]
    assert len(done[0]) + len(done[1]) == 14 and min(map(len, done)) >= 4, done
    assert not set(done[0]) & set(done[1])


# The default model's decoder layer (SmolLM2-135M): q/k/v over 576 inputs (576/192/192 rows),
# o 576 × 576, gate/up 1536 × 576, down 576 × 1536.
DEFAULT_GROUPS = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
DEFAULT_SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
                  "up": (1536, 576), "down": (576, 1536)}


@pytest.mark.parametrize("world", [2, 3])
def test_owner_plan_is_the_best_split_of_the_layer(world):
    """The plan covers every module and its busiest rank carries the least cost any assignment
    can (brute force over all assignments)."""
    plan = eora.plan_owners(DEFAULT_GROUPS, DEFAULT_SHAPES, world)
    assert sorted(plan) == sorted(DEFAULT_SHAPES) and set(plan.values()) == set(range(world))
    cost = {n: eora.factorisation_cost(*DEFAULT_SHAPES[n], len(g)) for g in DEFAULT_GROUPS for n in g}
    names = list(cost)

    def makespan(owners):
        return max(sum(cost[n] for n, r in zip(names, owners) if r == k) for k in range(world))

    best = min(makespan(o) for o in itertools.product(range(world), repeat=len(names)))
    assert makespan([plan[n] for n in names]) == pytest.approx(best)
    if world == 2:  # the layer's time on the busier rank is close to half of one rank's
        assert best < 0.56 * sum(cost.values())

