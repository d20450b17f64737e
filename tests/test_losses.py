"""Losses: registry and option errors, seed parameter names, invariances, mining, and that each one trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from speakerid.errors import SpeakeridError
from speakerid.losses import LOSSES, build_loss, loss_class, loss_options
from speakerid.losses.pairwise import pair_eer

D, C = 6, 9
WITH_CLASSES = {"softmax", "amsoftmax", "aamsoftmax", "softmaxproto", "mp", "mp_balance", "mmp", "mmp_balance",
                "proxyanchor", "proxynca"}
COSINE_BASED = {"amsoftmax", "aamsoftmax", "ge2e", "angleproto", "triplet", "contrastive", "mp", "mp_balance",
                "mmp", "mmp_balance", "proxyanchor", "proxynca"}
DETERMINISTIC_MINING = dict(hard_rank=0, hard_prob=1.0, margin=0.3)


def new_loss(name: str, n_out: int = D, n_classes: int = C, **extra):
    kwargs = dict(nOut=n_out, nClasses=n_classes) if name in WITH_CLASSES else {}
    if name in ("triplet", "contrastive"):
        kwargs |= DETERMINISTIC_MINING
    return build_loss(name, **(kwargs | extra))


def utts(name: str) -> int:
    return LOSSES[name].max_utts_per_speaker or 3


# ------------------------------------------------------------------------------------ registry, options

def test_registry_lists_every_seed_loss():
    assert set(LOSSES) == {"softmax", "amsoftmax", "aamsoftmax", "ge2e", "proto", "angleproto", "triplet",
                           "contrastive", "softmaxproto", "mp", "mp_balance", "mmp", "mmp_balance",
                           "proxyanchor", "proxynca"}
    assert loss_class("mmp_balance2") is LOSSES["mmp_balance"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(SpeakeridError, match="unknown loss 'angle_proto'.*angleproto.*mmp_balance"):
        build_loss("angle_proto")


def test_unknown_keyword_lists_valid_options():
    with pytest.raises(SpeakeridError, match=r"no option 'init_W'.*init_w=10\.0.*init_b=-5\.0"):
        build_loss("angleproto", init_W=3.0)
    with pytest.raises(SpeakeridError, match="nOut=<required>.*nClasses=<required>.*margin=0.3"):
        build_loss("amsoftmax", nOut=4, nClasses=3, m=0.2)


def test_missing_and_mistyped_options():
    with pytest.raises(SpeakeridError, match="needs option.*nClasses"):
        build_loss("softmax", nOut=4)
    with pytest.raises(SpeakeridError, match="'margin' must be float"):
        build_loss("amsoftmax", nOut=4, nClasses=3, margin="0.3")
    with pytest.raises(SpeakeridError, match="'easy_margin' must be bool"):
        build_loss("aamsoftmax", nOut=4, nClasses=3, easy_margin=1)
    assert build_loss("amsoftmax", nOut=4, nClasses=3, scale=30).scale == 30.0   # int accepted as float


def test_seed_keyword_spellings_are_accepted():
    loss = build_loss("mmp_balance2", n_classes=11, sz_embed=4, _lambda=0.25)
    assert loss.proxies.shape == (11, 4) and loss.lambda_init == 0.25
    assert build_loss("proxynca", n_classes=5, sz_embedding=3).proxies.shape == (5, 3)
    assert loss_options("mp_balance") == dict(nOut=512, nClasses=5994, w_init=10.0, b_init=-5.0, lambda_init=0.5,
                                              cross_rank_negatives=False)


@pytest.mark.parametrize("name", ["ge2e", "proto", "angleproto", "mp", "mp_balance", "mmp", "mmp_balance"])
def test_too_few_utterances_per_speaker(name):
    loss = new_loss(name)
    with pytest.raises(SpeakeridError, match=rf"loss '{name}' needs at least 2 utterances.*M=1"):
        loss(torch.randn(4, 1, D), torch.arange(4))
    with pytest.raises(SpeakeridError, match="at least 2"):
        LOSSES[name].check_utts_per_speaker(1)


@pytest.mark.parametrize("name", ["triplet", "contrastive", "softmaxproto"])
def test_pair_losses_need_exactly_two(name):
    with pytest.raises(SpeakeridError, match=rf"loss '{name}' needs exactly 2 utterances.*M=3"):
        new_loss(name)(torch.randn(4, 3, D), torch.arange(4))


def test_bad_shapes_are_reported():
    with pytest.raises(SpeakeridError, match=r"\(N, M, D\)"):
        new_loss("angleproto")(torch.randn(4, D), torch.arange(4))
    with pytest.raises(SpeakeridError, match="one label per speaker row"):
        new_loss("angleproto")(torch.randn(4, 2, D), torch.arange(8))


# ------------------------------------------------------------------------------- seed names and inits

SEED_PARAMETERS = {
    "softmax": {"fc.weight": (C, D), "fc.bias": (C,)},
    "amsoftmax": {"W": (D, C)},
    "aamsoftmax": {"weight": (C, D)},
    "ge2e": {"w": (), "b": ()},
    "proto": {},
    "angleproto": {"w": (), "b": ()},
    "triplet": {},
    "contrastive": {},
    "softmaxproto": {"softmax.fc.weight": (C, D), "softmax.fc.bias": (C,), "angleproto.w": (), "angleproto.b": ()},
    "mp": {"proxies": (C, D), "w": (), "b": (), "w2": (), "b2": ()},
    "mp_balance": {"proxies": (C, D), "w": (), "b": (), "w2": (), "b2": ()},
    "mmp": {"proxies": (C, D), "w": (), "b": (), "w2": (), "b2": ()},
    "mmp_balance": {"proxies": (C, D), "w": (), "b": ()},
    "proxyanchor": {"proxies": (C, D)},
    "proxynca": {"proxies": (C, D)},
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_seed_state_dict_loads_strictly(name):
    """A voxceleb_trainer/masked-proxy `.model` holds the loss as `__L__.<name>`: same names, same shapes."""
    seed_file = {f"__L__.{k}": torch.randn(shape) for k, shape in SEED_PARAMETERS[name].items()}
    loss = new_loss(name)
    loss.load_state_dict({k.removeprefix("__L__."): v for k, v in seed_file.items()}, strict=True)
    for key, value in seed_file.items():
        assert torch.equal(loss.state_dict()[key.removeprefix("__L__.")], value)


def test_initial_values_follow_the_seeds():
    for name in ("ge2e", "angleproto"):
        loss = new_loss(name)
        assert (loss.w.item(), loss.b.item()) == (10.0, -5.0)
    assert (new_loss("mp_balance").b.item(), new_loss("mmp_balance").b.item()) == (-5.0, 5.0)
    mp = new_loss("mp")
    assert not mp.w2.requires_grad and not mp.b2.requires_grad   # unused: DDP must not wait for a gradient
    torch.manual_seed(0)
    proxies = build_loss("mp_balance", nOut=64, nClasses=400).proxies
    assert proxies.std().item() == pytest.approx((2 / 400) ** 0.5, rel=0.05)   # Kaiming normal, fan_out
    assert build_loss("proxynca", nOut=64, nClasses=400).proxies.std().item() == pytest.approx(1 / 8, rel=0.05)
    flags = {name: cls.test_normalize for name, cls in LOSSES.items()}
    assert [name for name, flag in flags.items() if not flag] == ["proto"]


# ------------------------------------------------------------------------------------------ invariances

@pytest.mark.parametrize("name", list(LOSSES))
def test_permuting_speakers_with_labels(name):
    torch.manual_seed(1)
    loss = new_loss(name).double()
    x = torch.randn(5, utts(name), D, dtype=torch.float64)
    labels = torch.tensor([4, 0, 8, 2, 6])
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert loss(x[perm], labels[perm])[0].item() == pytest.approx(loss(x, labels)[0].item(), rel=1e-12)


@pytest.mark.parametrize("name", sorted(COSINE_BASED))
def test_cosine_losses_ignore_embedding_scale(name):
    torch.manual_seed(2)
    loss = new_loss(name).double()
    x = torch.randn(5, utts(name), D, dtype=torch.float64)
    labels = torch.tensor([4, 0, 8, 2, 6])
    assert loss(7.5 * x, labels)[0].item() == pytest.approx(loss(x, labels)[0].item(), rel=1e-12)


def test_cpu_only_and_half_precision_input():
    loss = new_loss("mmp_balance")
    value, accuracy = loss(torch.randn(4, 2, D).to(torch.bfloat16), torch.arange(4))
    assert value.dtype == torch.float32 and torch.isfinite(value)


# ------------------------------------------------------------------------------------- pairwise mining

def test_rank_mining_draws_only_other_speakers():
    loss = build_loss("triplet", hard_rank=1, hard_prob=0.0)
    labels = torch.tensor([0, 1, 0, 2, 3])
    similarity = torch.randn(5, 5)
    torch.manual_seed(3)
    draws = torch.stack([loss.mine_hard_negatives(similarity, labels) for _ in range(300)])
    for i in range(5):
        allowed = {j for j in range(5) if labels[j] != labels[i]}
        assert set(draws[:, i].tolist()) == allowed          # uniform over every other speaker, no same-label row


def test_hard_mining_draws_from_the_top_hard_rank_plus_one():
    loss = build_loss("triplet", hard_rank=1, hard_prob=1.0)
    labels = torch.tensor([0, 1, 0, 2, 3])
    similarity = torch.randn(5, 5)
    torch.manual_seed(4)
    draws = torch.stack([loss.mine_hard_negatives(similarity, labels) for _ in range(200)])
    for i in range(5):
        allowed = sorted((j for j in range(5) if labels[j] != labels[i]), key=lambda j: -similarity[i, j])
        assert set(draws[:, i].tolist()) == set(allowed[:2])


def test_semi_hard_mining():
    loss = build_loss("triplet", hard_rank=-1, margin=0.5)
    labels = torch.tensor([0, 1, 2, 3])
    # row 0: own similarity -1; row 2 lies in (-1.5, -1): the only semi-hard one. row 1: none, any negative.
    similarity = torch.tensor([[-1.0, -3.0, -1.2, -0.5],
                               [-9.0, -1.0, -4.0, -5.0],
                               [-2.0, -2.0, -1.0, -2.0],
                               [-2.0, -2.0, -2.0, -1.0]])
    torch.manual_seed(5)
    draws = torch.stack([loss.mine_hard_negatives(similarity, labels) for _ in range(100)])
    assert set(draws[:, 0].tolist()) == {2}
    assert set(draws[:, 1].tolist()) == {0, 2, 3}


def test_pair_eer_matches_the_seed_recipe():
    rng = np.random.default_rng(6)
    pos, neg = torch.tensor(rng.random(40)), torch.tensor(rng.random(40) + 0.3)
    scores, truth = -np.r_[pos, neg], np.r_[np.ones(40), np.zeros(40)]
    fpr, tpr, _ = roc_curve(truth, scores)
    i = np.argmin(np.abs(1 - tpr - fpr))
    assert pair_eer(pos, neg).item() == pytest.approx(100 * max(fpr[i], 1 - tpr[i]), rel=1e-6)
    assert pair_eer(torch.zeros(5), torch.ones(5)).item() == 0.0


# -------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("name", list(LOSSES))
def test_it_trains(name):
    """50 Adam steps of a linear embedding on class-clustered features lower the loss."""
    torch.manual_seed(7)
    n_classes, n_feat = 8, 12
    means = 2.0 * torch.randn(n_classes, n_feat)
    extra = {"hard_rank": 1, "hard_prob": 0.5, "margin": 0.5} if name == "triplet" else \
            {"hard_rank": 1, "hard_prob": 0.5, "margin": 1.0} if name == "contrastive" else {}
    loss = new_loss(name, n_out=8, n_classes=n_classes, **extra)
    model = torch.nn.Linear(n_feat, 8)
    optimiser = torch.optim.Adam([*model.parameters(), *loss.parameters()], lr=0.02)
    m, history = utts(name), []
    for _ in range(50):
        labels = torch.randperm(n_classes)[:6]
        feats = means[labels][:, None, :] + 0.7 * torch.randn(6, m, n_feat)
        value, _ = loss(model(feats), labels)
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        history.append(value.item())
    assert np.mean(history[-10:]) < 0.7 * np.mean(history[:10]), history
