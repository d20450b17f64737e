"""Every loss against a plain, loop-by-loop transcription of its formula (docs/fidelity.md), value and gradient.

The references below are written from the papers / docs/fidelity.md, one scalar at a time, and never call
speakerid's loss code. Two batches are used: distinct labels, and one where two rows share a label
(the same speaker on two ranks), which the references treat as the same speaker.
"""

from __future__ import annotations

import math

import pytest
import torch

from speakerid.losses import build_loss

N, M, D, C = 5, 3, 6, 9
DISTINCT = [3, 7, 0, 5, 2]
DUPLICATE = [3, 7, 0, 7, 2]     # rows 1 and 3: one speaker
EPS = 1e-6                      # F.pairwise_distance's eps, part of the seeds' distances


# ---------------------------------------------------------------------------------------------- helpers

def dot(u, v):
    return (u * v).sum()


def norm(u):
    return dot(u, u).sqrt()


def cos(u, v):
    return dot(u, v) / (norm(u) * norm(v))


def unit(u):
    return u / norm(u)


def mean(vectors):
    return sum(vectors) / len(vectors)


def cross_entropy(logits: list, target: int):
    """−log softmax(logits)[target] over a list of scalar logits."""
    return -logits[target] + torch.stack(logits).exp().sum().log()


def sq_dist(u, v):
    d = u - v + EPS
    return dot(d, d)


def average(terms):
    return sum(terms) / len(terms)


# ------------------------------------------------------------------------------------------- references

def ref_softmax(x, labels, fc_weight, fc_bias):
    terms = []
    for i in range(N):
        for m in range(x.shape[1]):
            logits = [dot(fc_weight[c], x[i, m]) + fc_bias[c] for c in range(C)]
            terms.append(cross_entropy(logits, labels[i]))
    return average(terms)


def ref_amsoftmax(x, labels, W, margin=0.3, scale=15.0):
    terms = []
    for i in range(N):
        for m in range(M):
            logits = [scale * (cos(x[i, m], W[:, c]) - (margin if c == labels[i] else 0.0)) for c in range(C)]
            terms.append(cross_entropy(logits, labels[i]))
    return average(terms)


def ref_aamsoftmax(x, labels, weight, margin=0.3, scale=15.0, easy_margin=False):
    terms = []
    for i in range(N):
        for m in range(M):
            logits = []
            for c in range(C):
                cs = cos(x[i, m], weight[c])
                if c == labels[i]:
                    shifted = torch.cos(torch.acos(cs) + margin)
                    if easy_margin:
                        cs = shifted if cs > 0 else cs
                    else:  # past θ + m > π: the linear fallback cos θ − m·sin(π − m)
                        cs = shifted if cs > math.cos(math.pi - margin) else cs - margin * math.sin(math.pi - margin)
                logits.append(scale * cs)
            terms.append(cross_entropy(logits, labels[i]))
    return average(terms)


def ref_ge2e(x, labels, w, b):
    terms = []
    for i in range(N):
        for m in range(M):
            logits, target = [], None
            for j in range(N):
                if j == i:
                    centroid = mean([x[i, k] for k in range(M) if k != m])   # own centroid without x_im
                    target = len(logits)
                elif labels[j] == labels[i]:
                    continue  # same speaker in another row: not a negative
                else:
                    centroid = mean([x[j, k] for k in range(M)])
                logits.append(w * torch.clamp(cos(x[i, m], centroid), min=1e-6) + b)
            terms.append(cross_entropy(logits, target))
    return average(terms)


def ref_prototypical(x, labels, similarity):
    terms = []
    for i in range(N):
        logits, target = [], None
        for j in range(N):
            if j != i and labels[j] == labels[i]:
                continue
            if j == i:
                target = len(logits)
            logits.append(similarity(x[i, 0], mean([x[j, k] for k in range(1, x.shape[1])])))
        terms.append(cross_entropy(logits, target))
    return average(terms)


def ref_angleproto(x, labels, w, b):
    return ref_prototypical(x, labels, lambda q, p: w * cos(q, p) + b)


def ref_proto(x, labels):
    return ref_prototypical(x, labels, lambda q, p: -sq_dist(q, p))


def ref_hardest_negatives(x, labels):
    anchors, positives = [unit(x[i, 0]) for i in range(N)], [unit(x[i, 1]) for i in range(N)]
    negatives = []
    for i in range(N):
        allowed = [j for j in range(N) if labels[j] != labels[i]]
        negatives.append(min(allowed, key=lambda j: sq_dist(anchors[i], positives[j]).item()))
    return anchors, positives, negatives


def ref_triplet(x, labels, margin):
    a, p, neg = ref_hardest_negatives(x, labels)
    return average([torch.relu(sq_dist(a[i], p[i]) - sq_dist(a[i], p[neg[i]]) + margin) for i in range(N)])


def ref_contrastive(x, labels, margin):
    a, p, neg = ref_hardest_negatives(x, labels)
    terms = [sq_dist(a[i], p[i]) for i in range(N)]
    terms += [torch.relu(margin - sq_dist(a[i], p[neg[i]]).sqrt()) ** 2 for i in range(N)]
    return average(terms)


def ref_softmaxproto(x, labels, fc_weight, fc_bias, w, b):
    return ref_softmax(x, labels, fc_weight, fc_bias) + ref_angleproto(x, labels, w, b)


def masked_proxy_parts(x, labels, grouped):
    """Queries, centroids, query labels, from unit-normalised utterances (the masked-proxy trainer normalises)."""
    xs = [[unit(x[i, m]) for m in range(M)] for i in range(N)]
    if not grouped:  # balanced: one query per row
        return [xs[i][0] for i in range(N)], [mean(xs[i][1:]) for i in range(N)], list(labels)
    groups: dict[int, list] = {}
    for i in range(N):
        for m in range(M):
            groups.setdefault(labels[i], []).append(xs[i][m])
    return ([g[0] for g in groups.values()], [mean(g[1:]) for g in groups.values()], list(groups))


def batch_centers(centroids, query_labels):
    """Label → mean of the centroids of the rows with that label."""
    return {c: mean([a for a, y in zip(centroids, query_labels) if y == c]) for c in sorted(set(query_labels))}


def ref_mp(x, labels, proxies, w, b, lambda_=0.5, grouped=False):
    queries, centroids, qlabels = masked_proxy_parts(x, labels, grouped)
    centers = batch_centers(centroids, qlabels)
    classes = sorted(centers)
    p_unit = [unit(proxies[c]) for c in range(C)]
    loss1 = average([cross_entropy([w * dot(q, centers.get(c, p_unit[c])) + b for c in range(C)], y)
                     for q, y in zip(queries, qlabels)])
    loss2 = average([cross_entropy([w * dot(a, p_unit[c]) + b for c in classes], classes.index(y))
                     for a, y in zip(centroids, qlabels)])
    return loss1 + lambda_ * loss2


def ref_mmp(x, labels, proxies, w, b, lambda_=0.5, grouped=False, balance=True):
    queries, centroids, qlabels = masked_proxy_parts(x, labels, grouped)
    centers = {c: a / (dot(a, a) + 1e-12).sqrt() for c, a in batch_centers(centroids, qlabels).items()}
    classes = sorted(centers)
    p_unit = [unit(proxies[c]) for c in range(C)]
    l1 = (1 + sum(torch.exp(-w * dot(q, centers[y]) + b) for q, y in zip(queries, qlabels))).log()
    l2 = average([(1 + sum(torch.exp(w * dot(q, p_unit[c]) - b) for c in range(C) if c not in centers)).log()
                  for q in queries])
    l3 = average([(1 + sum(torch.exp(w * dot(q, centers[c]) - b) for c in classes if c != y)).log()
                  for q, y in zip(queries, qlabels)])
    loss = l1 + l2 + l3
    if balance:
        loss = loss + lambda_ * average([cross_entropy([w * dot(a, p_unit[c]) - b for c in classes], classes.index(y))
                                         for a, y in zip(centroids, qlabels)])
    return loss


def ref_proxyanchor(x, labels, proxies, mrg=0.1, alpha=30.0):
    samples = [(x[i, m], labels[i]) for i in range(N) for m in range(M)]
    present = sorted(set(labels))
    pos_term = neg_term = 0.0
    for c in range(C):
        pos = sum(torch.exp(-alpha * (cos(v, proxies[c]) - mrg)) for v, y in samples if y == c)
        neg = sum(torch.exp(alpha * (cos(v, proxies[c]) + mrg)) for v, y in samples if y != c)
        pos_term = pos_term + torch.log(1 + torch.as_tensor(pos))
        neg_term = neg_term + torch.log(1 + torch.as_tensor(neg))
    return pos_term / len(present) + neg_term / C


def ref_proxynca(x, labels, proxies, smoothing_const=0.1, scaling_x=1.0, scaling_p=3.0):
    terms = []
    for i in range(N):
        for m in range(M):
            v = scaling_x * unit(x[i, m])
            neg_d = [-dot(v - scaling_p * unit(proxies[c]), v - scaling_p * unit(proxies[c])) for c in range(C)]
            log_z = torch.stack(neg_d).exp().sum().log()
            target = [1 - smoothing_const if c == labels[i] else smoothing_const / (C - 1) for c in range(C)]
            terms.append(-sum(t * (s - log_z) for t, s in zip(target, neg_d)))
    return average(terms)


# ------------------------------------------------------------------------------------------------ cases

CASES = {
    # name: (build kwargs, M, reference(x, labels, params: dict))
    "softmax": (dict(nOut=D, nClasses=C), M, lambda x, y, p: ref_softmax(x, y, p["fc.weight"], p["fc.bias"])),
    "amsoftmax": (dict(nOut=D, nClasses=C, margin=0.3, scale=15.0), M, lambda x, y, p: ref_amsoftmax(x, y, p["W"])),
    "aamsoftmax": (dict(nOut=D, nClasses=C, margin=0.3, scale=15.0), M,
                   lambda x, y, p: ref_aamsoftmax(x, y, p["weight"])),
    "aamsoftmax-easy": (dict(nOut=D, nClasses=C, margin=0.3, scale=15.0, easy_margin=True), M,
                        lambda x, y, p: ref_aamsoftmax(x, y, p["weight"], easy_margin=True)),
    "aamsoftmax-fallback": (dict(nOut=D, nClasses=C, margin=1.5, scale=15.0), M,  # θ + m > π is common here
                            lambda x, y, p: ref_aamsoftmax(x, y, p["weight"], margin=1.5)),
    "ge2e": (dict(), M, lambda x, y, p: ref_ge2e(x, y, p["w"], p["b"])),
    "proto": (dict(), M, lambda x, y, p: ref_proto(x, y)),
    "angleproto": (dict(), M, lambda x, y, p: ref_angleproto(x, y, p["w"], p["b"])),
    "triplet": (dict(hard_rank=0, hard_prob=1.0, margin=0.3), 2, lambda x, y, p: ref_triplet(x, y, 0.3)),
    "contrastive": (dict(hard_rank=0, hard_prob=1.0, margin=1.2), 2, lambda x, y, p: ref_contrastive(x, y, 1.2)),
    "softmaxproto": (dict(nOut=D, nClasses=C), 2, lambda x, y, p: ref_softmaxproto(
        x, y, p["softmax.fc.weight"], p["softmax.fc.bias"], p["angleproto.w"], p["angleproto.b"])),
    "mp": (dict(nOut=D, nClasses=C), M, lambda x, y, p: ref_mp(x, y, p["proxies"], p["w"], p["b"], grouped=True)),
    "mp_balance": (dict(nOut=D, nClasses=C), M, lambda x, y, p: ref_mp(x, y, p["proxies"], p["w"], p["b"])),
    "mmp": (dict(nOut=D, nClasses=C), M,
            lambda x, y, p: ref_mmp(x, y, p["proxies"], p["w"], p["b"], grouped=True, balance=False)),
    "mmp_balance": (dict(nOut=D, nClasses=C), M, lambda x, y, p: ref_mmp(x, y, p["proxies"], p["w"], p["b"])),
    "proxyanchor": (dict(nOut=D, nClasses=C), M, lambda x, y, p: ref_proxyanchor(x, y, p["proxies"])),
    "proxynca": (dict(nOut=D, nClasses=C), M, lambda x, y, p: ref_proxynca(x, y, p["proxies"])),
}


def make(case: str, labels: list[int], seed: int = 0):
    kwargs, m, reference = CASES[case]
    torch.manual_seed(seed)
    loss = build_loss(case.split("-")[0], **kwargs).double()
    with torch.no_grad():  # move w/b away from their inits so their gradients are exercised generically
        for name, p in loss.named_parameters():
            if p.dim() == 0:
                p.add_(0.3 * torch.randn(()))
    x = torch.randn(N, m, D, dtype=torch.float64, requires_grad=True)
    if case == "proto":
        x = (3 * x).detach().requires_grad_()
    return loss, x, torch.tensor(labels), reference


@pytest.mark.parametrize("labels", [DISTINCT, DUPLICATE], ids=["distinct", "duplicate"])
@pytest.mark.parametrize("case", list(CASES))
def test_value_and_gradient_match_reference(case, labels):
    loss, x, y, reference = make(case, labels)
    params = dict(loss.named_parameters())
    trainable = [p for p in params.values() if p.requires_grad]
    value, accuracy = loss(x, y)
    grads = torch.autograd.grad(value, [x, *trainable])
    expected = reference(x, labels, params)
    expected_grads = torch.autograd.grad(expected, [x, *trainable], allow_unused=True)
    assert value.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-9)
    for name, got, want in zip(["x", *[k for k, p in params.items() if p.requires_grad]], grads, expected_grads):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"{case}: d loss / d {name}")
    assert accuracy.requires_grad is False and accuracy.dim() == 0 and 0 <= accuracy.item() <= 100


def test_duplicate_rows_are_not_negatives():
    """The masked reference differs from a positional one, so the duplicate case above is a real check."""
    loss, x, y, _ = make("angleproto", DUPLICATE)
    params = dict(loss.named_parameters())
    positional = ref_angleproto(x, list(range(N)), params["w"], params["b"])   # every row its own speaker
    assert loss(x, y)[0].item() != pytest.approx(positional.item(), rel=1e-6)


def test_mp_equals_mp_balance_on_distinct_labels():
    mp, x, y, _ = make("mp", DISTINCT)
    balance = build_loss("mp_balance", nOut=D, nClasses=C).double()
    balance.load_state_dict(mp.state_dict())
    assert mp(x, y)[0].item() == pytest.approx(balance(x, y)[0].item(), rel=1e-12)
