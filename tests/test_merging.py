"""Merge methods, per tensor: each against an independent numpy version written from its paper's
definition, on random tensors; special cases; parameters and names validated."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fairseq_ext.merging import get_method, make_params, tensor_generator  # noqa: E402
from fairseq_ext.merging.dare import drop_mask  # noqa: E402
from launcher.contract.errors import BtmError  # noqa: E402

SHAPE = (37, 23)
WEIGHTS = [0.5, 0.2, 0.3]


@pytest.fixture
def tensors():
    g = np.random.default_rng(0)
    base = g.normal(0, 1, SHAPE).astype(np.float32)
    experts = [(base + g.normal(0, 0.1, SHAPE)).astype(np.float32) for _ in WEIGHTS]
    return base, experts


def run(name, base, experts, weights=WEIGHTS, key="decoder.layers.0.w", seed=0, **params):
    method = get_method(name)
    out = method.merge(None if base is None else torch.from_numpy(base),
                       [torch.tensor(x) for x in experts], weights,  # copies: it may overwrite them
                       make_params(method, params), tensor_generator(seed, key))
    return out.numpy()


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# -- numpy references, from the papers' definitions (float64) ----------------------------------

def ref_top_k(tau, density):
    """TIES step 1: keep the k = max(1, int(density * n)) largest |tau|."""
    k = max(1, int(density * tau.size))
    flat = tau.ravel().copy()
    flat[np.argsort(-np.abs(flat), kind="stable")[k:]] = 0
    return flat.reshape(tau.shape)


def ref_disjoint_mean(taus, weights):
    """TIES steps 2-3: elected sign of the weighted mass, mean over the experts that agree."""
    mass = sum(w * t for w, t in zip(weights, taus))
    gamma = np.where(mass >= 0, 1.0, -1.0)
    agree = [(np.sign(t) == gamma) & (t != 0) for t in taus]
    num = sum(w * t * a for w, t, a in zip(weights, taus, agree))
    den = sum(w * a for w, a in zip(weights, agree))
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def dare_masks(n, shape, density, key, seed=0):
    g = tensor_generator(seed, key)
    return [drop_mask(shape, density, g).numpy() for _ in range(n)]


# -- each method against its reference ---------------------------------------------------------

def test_linear_is_the_exact_fp32_weighted_sum(tensors):
    base, experts = tensors
    hand = np.zeros(SHAPE, np.float32)
    for w, x in zip(WEIGHTS, experts):
        hand = hand + np.float32(w) * x
    assert np.array_equal(run("linear", None, experts), hand)


def test_task_arithmetic(tensors):
    base, experts = tensors
    b = base.astype(np.float64)
    taus = [x - b for x in experts]
    close(run("task_arithmetic", base, experts, **{"lambda": 0.7}),
          b + 0.7 * sum(w * t for w, t in zip(WEIGHTS, taus)))


@pytest.mark.parametrize("density,lam", [(0.2, 1.0), (0.5, 1.3), (1.0, 1.0)])
def test_ties(tensors, density, lam):
    base, experts = tensors
    b = base.astype(np.float64)
    trimmed = [ref_top_k(x - b, density) for x in experts]
    want = b + lam * ref_disjoint_mean(trimmed, WEIGHTS)
    close(run("ties", base, experts, density=density, lambda_=lam), want)


def test_dare_linear(tensors):
    base, experts = tensors
    b = base.astype(np.float64)
    masks = dare_masks(len(experts), SHAPE, 0.3, "k")
    want = b + 1.2 * sum(w * m * (x - b) / 0.3 for w, m, x in zip(WEIGHTS, masks, experts))
    close(run("dare_linear", base, experts, key="k", density=0.3, lambda_=1.2), want)


def test_dare_ties(tensors):
    base, experts = tensors
    b = base.astype(np.float64)
    masks = dare_masks(len(experts), SHAPE, 0.4, "k")
    dropped = [m * (x - b) / 0.4 for m, x in zip(masks, experts)]
    close(run("dare_ties", base, experts, key="k", density=0.4),
          b + ref_disjoint_mean(dropped, WEIGHTS))


def test_model_stock(tensors):
    base, experts = tensors
    b = base.astype(np.float64)
    taus = [(x - b).ravel() for x in experts]
    cosines = [taus[i] @ taus[j] / (np.linalg.norm(taus[i]) * np.linalg.norm(taus[j]))
               for i in range(len(taus)) for j in range(i + 1, len(taus))]
    cos = min(max(np.mean(cosines), 0.0), 1.0)
    n = len(experts)
    t = n * cos / (1 + (n - 1) * cos)
    avg = sum(w * x.astype(np.float64) for w, x in zip(WEIGHTS, experts))
    assert 0 < cos < 1
    close(run("model_stock", base, experts), t * avg + (1 - t) * b)


def test_model_stock_pulls_towards_the_base_when_task_vectors_are_orthogonal():
    base = np.zeros((2,), np.float32)
    experts = [np.array([1, 0], np.float32), np.array([0, 1], np.float32)]
    assert np.array_equal(run("model_stock", base, experts, weights=[0.5, 0.5]), base)


# -- special cases ----------------------------------------------------------------------------

def within_rounding(out, expert, base):
    """base + (x - base) in fp32 is x up to one rounding of the larger operand."""
    bound = 2 * np.finfo(np.float32).eps * np.maximum(np.abs(expert), np.abs(base))
    assert np.all(np.abs(out - expert) <= bound)


def test_one_expert_reductions(tensors):
    base, (x, *_) = tensors
    within_rounding(run("ties", base, [x], weights=[1.0], density=1.0), x, base)
    within_rounding(run("task_arithmetic", base, [x], weights=[1.0]), x, base)
    within_rounding(run("dare_linear", base, [x], weights=[1.0], density=1.0), x, base)
    assert np.array_equal(run("model_stock", base, [x], weights=[1.0]), x)
    assert np.array_equal(run("linear", None, [x], weights=[1.0]), x)


def test_ties_trims_to_the_density():
    tau = np.arange(1, 101, dtype=np.float32).reshape(10, 10) * np.where(np.arange(100) % 2, 1, -1).reshape(10, 10)
    out = run("ties", np.zeros_like(tau), [tau], weights=[1.0], density=0.2)
    assert np.count_nonzero(out) == 20 and np.all(np.abs(out[out != 0]) > 80)


def test_dare_drop_is_seeded_per_tensor_name_and_keeps_the_density():
    shape = (400, 250)
    a = drop_mask(shape, 0.3, tensor_generator(7, "decoder.a")).numpy()
    assert np.array_equal(a, drop_mask(shape, 0.3, tensor_generator(7, "decoder.a")).numpy())
    assert not np.array_equal(a, drop_mask(shape, 0.3, tensor_generator(7, "decoder.b")).numpy())
    assert not np.array_equal(a, drop_mask(shape, 0.3, tensor_generator(8, "decoder.a")).numpy())
    assert abs(a.mean() - 0.3) < 0.01
    # rescaled by 1 / density: the expected task vector is unchanged
    tau = np.ones(shape, np.float32)
    out = run("dare_linear", np.zeros(shape, np.float32), [tau], weights=[1.0], density=0.3)
    assert abs(out.mean() - 1.0) < 0.03
    np.testing.assert_allclose(np.unique(out), [0.0, 1 / 0.3], rtol=1e-6)


# -- parameters and names ---------------------------------------------------------------------

def test_defaults_come_from_the_papers():
    assert make_params(get_method("ties")) == get_method("ties").params(density=0.2, lambda_=1.0)
    assert make_params(get_method("dare_ties")).density == 0.5
    assert make_params(get_method("task_arithmetic")).lambda_ == 1.0


@pytest.mark.parametrize("name,params,match", [
    ("ties", {"density": 0}, r"density must be in \(0, 1\].*0"),
    ("ties", {"density": 1.5}, r"density must be in \(0, 1\].*1\.5"),
    ("dare_ties", {"density": -0.1}, "density"),
    ("dare_linear", {"density": "half"}, "density"),
    ("task_arithmetic", {"lambda": 0}, "lambda must be"),
    ("ties", {"lambda": float("nan")}, "lambda must be"),
    ("ties", {"densty": 0.3}, "no parameter 'densty'; did you mean 'density'"),
    ("linear", {"density": 0.3}, "no parameter 'density'; it takes no parameters"),
    ("model_stock", {"lambda": 1}, "no parameter 'lambda'"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(BtmError, match=match):
        make_params(get_method(name), params)


@pytest.mark.parametrize("typo,meant", [("tie", "ties"), ("dare-ties", "dare_ties"),
                                        ("task_arithmetics", "task_arithmetic"),
                                        ("modelstock", "model_stock")])
def test_method_typo_says_did_you_mean(typo, meant):
    with pytest.raises(BtmError, match=f"unknown merge method '{typo}'; did you mean '{meant}'"):
        get_method(typo)
