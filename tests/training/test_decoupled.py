import numpy as np
import pytest
import torch

from tests.training.synthetic import blobs, class_means
from training.decoupled import predict_logits, retrain_classifier, select_tau, tau_normalize
from training.losses import build_loss
from training.metrics import compute_metrics, macro_f1
from training.samplers import FrequencySampler

C, DIM = 7, 16
COUNTS = [1000, 400, 250, 150, 80, 30, 20]
NAMES = tuple(str(c) for c in range(C))
MINORITY = ("4", "5", "6")


def _tensors(counts, seed):
    x, y = blobs(counts, class_means(C, DIM, radius=3.0), seed)
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)


@pytest.fixture(scope="module")
def data():
    return _tensors(COUNTS, 1), _tensors([100] * C, 2), _tensors([300] * C, 3)


def _report(head, split):
    x, y = split
    return compute_metrics(y, predict_logits(head, x).argmax(dim=1), NAMES, minority=MINORITY)


def test_crt_raises_minority_recall_over_plain_head(data):
    (x, y), _, test = data
    plain = retrain_classifier(x, y, C, sampler=FrequencySampler(1.0), epochs=15, lr=1e-2)
    crt = retrain_classifier(x, y, C, epochs=15, lr=1e-2)
    plain_report, crt_report = _report(plain, test), _report(crt, test)
    assert crt_report.minority_recall > plain_report.minority_recall + 0.2
    assert crt_report.macro_f1 > plain_report.macro_f1


def test_crt_is_deterministic_and_trains_a_given_head_in_place(data):
    (x, y), _, _ = data
    first = retrain_classifier(x, y, C, epochs=2, lr=1e-2, seed=5)
    second = retrain_classifier(x, y, C, epochs=2, lr=1e-2, seed=5)
    torch.testing.assert_close(first.weight, second.weight)
    head = torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.ReLU(), torch.nn.Linear(8, C))
    before = head[0].weight.detach().clone()
    loss = build_loss("ldam", np.bincount(y.numpy()), max_margin=0.5, s=1.0, drw_epoch=1, beta=0.9999)
    assert retrain_classifier(x, y, C, head=head, loss=loss, epochs=2, lr=1e-3) is head
    assert not torch.equal(before, head[0].weight)


def test_tau_normalisation(data):
    (x, y), dev, test = data
    head = torch.nn.Linear(DIM, C, bias=False)  # without a bias the prior lives in the weight norms
    retrain_classifier(x, y, C, head=head, sampler=FrequencySampler(1.0), epochs=15, lr=1e-2)
    unit = tau_normalize(head, 1.0)
    torch.testing.assert_close(unit.weight.norm(dim=1), torch.ones(C))
    torch.testing.assert_close(tau_normalize(head, 0.0).weight, head.weight)
    search = select_tau(head, *dev)
    assert search.value > 0 and search.score == max(search.scores.values())
    test_x, test_y = test
    before = macro_f1(test_y, predict_logits(head, test_x).argmax(dim=1), C)
    after = macro_f1(test_y, predict_logits(tau_normalize(head, search.value), test_x).argmax(dim=1), C)
    assert after > before + 0.03


def test_tau_norm_scores_without_the_bias():
    head = torch.nn.Linear(DIM, C)
    with torch.no_grad():
        head.bias.copy_(torch.linspace(-5, 5, C))  # a strong prior in the bias must not survive
    x = torch.randn(10, DIM)
    for tau in (0.0, 0.5, 1.0):
        normalised = tau_normalize(head, tau)
        expected = x @ (head.weight / head.weight.norm(dim=1, keepdim=True).pow(tau)).T
        torch.testing.assert_close(predict_logits(normalised, x), expected)
    assert torch.equal(head.bias, torch.linspace(-5, 5, C))  # the original is untouched
