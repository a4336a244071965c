"""SGD and Adam trajectories against torch.optim, in float64.

The same parameters and the same sequence of gradients (a deterministic function of
the current weights, so a wrong update changes every later gradient) go through our
optimizer and torch's for 20 steps; the weights must agree at every step.
"""
import pytest
import torch

from n2n_core import SGD, Adam, Parameter

SHAPES = [(4, 3, 3, 3), (4,), (2, 5)]


def _start(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def _grads(weights, step):
    """A gradient that depends on the weights (a quadratic bowl plus a step-dependent tilt)."""
    g = torch.Generator().manual_seed(1000 + step)
    return [w * 0.7 + torch.sin(w) + torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.1 for w in weights]


def _run_pair(ours_cls, theirs_cls, steps=20, lr_schedule=None, **kwargs):
    start = _start()
    ours = [Parameter(w.clone()) for w in start]
    theirs = [torch.nn.Parameter(w.clone()) for w in start]
    opt = ours_cls(ours, **kwargs)
    ref = theirs_cls(theirs, **kwargs)
    for step in range(steps):
        if lr_schedule is not None:
            opt.lr = lr_schedule(step)
            for group in ref.param_groups:
                group["lr"] = lr_schedule(step)
        opt.zero_grad()
        ref.zero_grad()
        for p, g in zip(ours, _grads([p.data for p in ours], step)):
            p.grad += g
        for p, g in zip(theirs, _grads([p.detach() for p in theirs], step)):
            p.grad = g
        opt.step()
        ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(
                a.data, b.detach(), rtol=1e-12, atol=1e-14, msg=lambda m: f"step {step}, parameter {i}: {m}"
            )
    # the optimizer did move the weights (a test that cannot fail is no test)
    assert not torch.equal(ours[0].data, start[0])
    return opt, ours


SGD_OPTIONS = {
    "plain": dict(lr=0.05),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.05, weight_decay=0.01),
    "combined": dict(lr=0.03, momentum=0.8, nesterov=True, weight_decay=0.05),
    "momentum_weight_decay": dict(lr=0.03, momentum=0.5, weight_decay=0.05),
}


@pytest.mark.parametrize("name", list(SGD_OPTIONS))
def test_sgd_matches_torch(name):
    _run_pair(SGD, torch.optim.SGD, **SGD_OPTIONS[name])


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01)],
    ids=["default", "weight_decay", "custom"],
)
def test_adam_matches_torch(kwargs):
    _run_pair(Adam, torch.optim.Adam, **kwargs)


def test_mutable_lr_schedule_matches_torch():
    _run_pair(Adam, torch.optim.Adam, lr=1e-2, lr_schedule=lambda s: 1e-2 * 0.9**s)
    _run_pair(SGD, torch.optim.SGD, lr=0.1, momentum=0.9, lr_schedule=lambda s: 0.1 / (1 + s))


@pytest.mark.parametrize(
    "cls, kwargs",
    [(SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)), (Adam, dict(lr=1e-2, weight_decay=0.01))],
    ids=["sgd", "adam"],
)
def test_state_dict_resume_continues_identically(cls, kwargs):
    """10 steps, save, load into a fresh optimizer, 10 more == 20 uninterrupted steps."""
    full_opt, full = _run_pair(cls, getattr(torch.optim, cls.__name__), steps=20, **kwargs)

    params = [Parameter(w.clone()) for w in _start()]
    opt = cls(params, **kwargs)
    for step in range(10):
        opt.zero_grad()
        for p, g in zip(params, _grads([p.data for p in params], step)):
            p.grad += g
        opt.step()
    saved = opt.state_dict()
    for entry in saved["state"].values():
        assert all(isinstance(v, (torch.Tensor, int, float)) for v in entry.values())
    resumed = cls(params, lr=123.0)
    resumed.load_state_dict(saved)
    assert resumed.lr == kwargs["lr"]
    for step in range(10, 20):
        resumed.zero_grad()
        for p, g in zip(params, _grads([p.data for p in params], step)):
            p.grad += g
        resumed.step()
    for a, b in zip(params, full):
        torch.testing.assert_close(a.data, b.data, rtol=0, atol=0)


def test_state_dict_contains_only_plain_types():
    params = [Parameter(torch.randn(3, dtype=torch.float64))]
    opt = Adam(params)
    params[0].grad += 1
    opt.step()
    sd = opt.state_dict()
    assert sd["type"] == "Adam" and sd["hyperparams"]["betas"] == [0.9, 0.999]
    assert sd["state"][0]["step"] == 1 and set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (SGD, dict(lr=-1.0), "learning rate"),
        (SGD, dict(lr=0.1, momentum=-0.5), "momentum"),
        (SGD, dict(lr=0.1, nesterov=True), "Nesterov"),
        (SGD, dict(lr=0.1, weight_decay=-1), "weight_decay"),
        (SGD, dict(lr=float("nan")), "learning rate"),
        (Adam, dict(lr=-1e-3), "learning rate"),
        (Adam, dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
        (Adam, dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
        (Adam, dict(eps=-1.0), "epsilon"),
        (Adam, dict(betas=(0.9,)), "betas"),
    ],
)
def test_invalid_arguments_are_rejected(cls, kwargs, match):
    kwargs = {"lr": 0.1, **kwargs} if cls is SGD else kwargs
    with pytest.raises(ValueError, match=match):
        cls([Parameter(torch.zeros(2))], **kwargs)


def test_parameter_list_is_checked():
    p = Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        SGD([], lr=0.1)
    with pytest.raises(TypeError, match="not a Parameter"):
        SGD([torch.zeros(2)], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        SGD([p, p], lr=0.1)


def test_load_state_dict_rejects_mismatches():
    params = [Parameter(torch.zeros(2, 3))]
    opt = Adam(params)
    params[0].grad += 1
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="not 'SGD'"):
        SGD(params, lr=0.1).load_state_dict(sd)
    other = Adam([Parameter(torch.zeros(3, 2))])
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        other.load_state_dict(sd)
    bad = {**sd, "state": {5: sd["state"][0]}}
    with pytest.raises(ValueError, match="parameter 5"):
        Adam(params).load_state_dict(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls, kwargs", [(SGD, SGD_OPTIONS["combined"]), (Adam, dict(lr=1e-2, weight_decay=0.1))],
                         ids=["sgd", "adam"])
def test_cuda_matches_cpu(cls, kwargs):
    cpu = [Parameter(w.clone()) for w in _start()]
    gpu = [Parameter(w.clone().cuda()) for w in _start()]
    opts = cls(cpu, **kwargs), cls(gpu, **kwargs)
    for step in range(20):
        for params, opt in zip((cpu, gpu), opts):
            opt.zero_grad()
            for p, g in zip(params, _grads([p.data.cpu() for p in params], step)):
                p.grad += g.to(p.device)
            opt.step()
    for a, b in zip(cpu, gpu):
        assert b.data.is_cuda
        torch.testing.assert_close(a.data, b.data.cpu(), rtol=1e-12, atol=1e-14)


# -- flat parameters: one update over the whole (P,) buffer ------------------------------

def _flat_params(dtype=torch.float64, seed=0):
    """Parameters of SHAPES whose data and grads are views into one buffer each (as FlatParameters makes them)."""
    start = [w.to(dtype) for w in _start(seed)]
    size = sum(w.numel() for w in start)
    data, grads = torch.empty(size, dtype=dtype), torch.zeros(size, dtype=dtype)
    params, offset = [], 0
    for w in start:
        n = w.numel()
        p = Parameter(w.clone())
        p.data = data[offset:offset + n].view(w.shape)
        p.data.copy_(w)
        p.grad = grads[offset:offset + n].view(w.shape)
        params.append(p)
        offset += n
    return params


def _train(opt, params, steps, first=0, lr_schedule=None, spans=None):
    """`steps` optimizer steps; with `spans`, each step updates those spans one after the other (the
    order a data-parallel driver steps gradient buckets in: the last parameters first)."""
    for step in range(first, first + steps):
        if lr_schedule is not None:
            opt.lr = lr_schedule(step)
        opt.zero_grad()
        for p, g in zip(params, _grads([p.data for p in params], step)):
            p.grad += g.to(p.dtype)
        for span in spans or [None]:
            opt.step(span)


FLAT_CASES = [(Adam, dict(lr=1e-2)), (Adam, dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01)),
              *[(SGD, kwargs) for kwargs in SGD_OPTIONS.values()]]
FLAT_IDS = ["adam", "adam_custom", *[f"sgd_{name}" for name in SGD_OPTIONS]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cls, kwargs", FLAT_CASES, ids=FLAT_IDS)
def test_flat_update_equals_the_per_parameter_loop_bit_for_bit(cls, kwargs, dtype):
    flat, loop = _flat_params(dtype), _flat_params(dtype)
    _train(cls(flat, **kwargs), flat, 20, lr_schedule=lambda s: kwargs["lr"] * 0.9**s)
    _train(cls(loop, flat=False, **kwargs), loop, 20, lr_schedule=lambda s: kwargs["lr"] * 0.9**s)
    for i, (a, b) in enumerate(zip(flat, loop)):
        assert torch.equal(a.data, b.data), f"parameter {i}: flat and per-parameter updates differ"
    assert not torch.equal(flat[0].data, _start()[0].to(dtype)), "the weights did not move"


@pytest.mark.parametrize("cls, kwargs", [(Adam, dict(lr=1e-2)), (SGD, SGD_OPTIONS["momentum"])], ids=["adam", "sgd"])
def test_flat_update_keeps_its_state_in_one_buffer(cls, kwargs):
    params = _flat_params()
    opt = cls(params, **kwargs)
    _train(opt, params, 2)
    names = cls._state_tensors
    for name in names:
        storages = {opt.state[i][name].untyped_storage().data_ptr() for i in range(len(params))}
        assert len(storages) == 1, f"{name}: one buffer per parameter, not one for all"
        assert [tuple(opt.state[i][name].shape) for i in range(len(params))] == SHAPES


def test_flat_adam_matches_torch():
    params = _flat_params()
    theirs = [torch.nn.Parameter(w.clone()) for w in _start()]
    ours, ref = Adam(params, lr=1e-2, weight_decay=0.1), torch.optim.Adam(theirs, lr=1e-2, weight_decay=0.1)
    for step in range(20):
        _train(ours, params, 1, first=step)
        ref.zero_grad()
        for p, g in zip(theirs, _grads([p.detach() for p in theirs], step)):
            p.grad = g
        ref.step()
    for i, (a, b) in enumerate(zip(params, theirs)):
        torch.testing.assert_close(a.data, b.detach(), rtol=1e-12, atol=1e-14, msg=lambda m: f"parameter {i}: {m}")


@pytest.mark.parametrize("cls, kwargs", [(Adam, dict(lr=1e-2, weight_decay=0.01)),
                                         (SGD, SGD_OPTIONS["combined"])], ids=["adam", "sgd"])
@pytest.mark.parametrize("first, then", [(True, False), (False, True)], ids=["flat_to_loop", "loop_to_flat"])
def test_state_moves_between_flat_and_loop(cls, kwargs, first, then):
    """10 steps one way, state_dict, load into the other, 10 more == 20 steps of the loop."""
    full = _flat_params()
    _train(cls(full, flat=False, **kwargs), full, 20)
    params = _flat_params()
    opt = cls(params, flat=first, **kwargs)
    _train(opt, params, 10)
    saved = opt.state_dict()
    assert all(tuple(saved["state"][i][k].shape) == SHAPES[i] for i in saved["state"] for k in cls._state_tensors
               if k in saved["state"][i]), "the state_dict is per parameter either way"
    resumed = cls(params, flat=then, **kwargs)
    resumed.load_state_dict(saved)
    _train(resumed, params, 10, first=10)
    for i, (a, b) in enumerate(zip(params, full)):
        assert torch.equal(a.data, b.data), f"parameter {i} differs after the state moved"


def test_rebound_parameter_falls_back_to_the_loop():
    params, loop = _flat_params(), _flat_params()
    opt, ref = Adam(params, lr=1e-2), Adam(loop, lr=1e-2, flat=False)
    _train(opt, params, 3)
    _train(ref, loop, 3)
    params[1].data = params[1].data.clone()  # re-bound (as Module.to does): no longer a view of the buffer
    _train(opt, params, 3, first=3)
    _train(ref, loop, 3, first=3)
    for i, (a, b) in enumerate(zip(params, loop)):
        assert torch.equal(a.data, b.data), f"parameter {i}"


def test_parameters_at_different_steps_take_the_loop():
    params = _flat_params()
    opt = Adam(params, lr=1e-2)
    _train(opt, params, 2)
    saved = opt.state_dict()
    saved["state"][1]["step"] = 7  # e.g. a parameter that joined later: its own bias correction
    loop = _flat_params()
    ref = Adam(loop, lr=1e-2, flat=False)
    _train(ref, loop, 2)
    for o in (opt, ref):
        o.load_state_dict(saved)
    _train(opt, params, 2, first=2)
    _train(ref, loop, 2, first=2)
    assert opt.state_dict()["state"][1]["step"] == 9 and opt.state_dict()["state"][0]["step"] == 4
    for i, (a, b) in enumerate(zip(params, loop)):
        assert torch.equal(a.data, b.data), f"parameter {i}"


# -- a span of parameters: a step taken bucket by bucket ---------------------------------

SPANS = [[range(2, 3), range(1, 2), range(0, 1)], [range(1, 3), range(0, 1)], [range(0, 3)]]


@pytest.mark.parametrize("spans", SPANS, ids=["one_each", "two_then_one", "all"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "loop"])
@pytest.mark.parametrize("cls, kwargs", FLAT_CASES, ids=FLAT_IDS)
def test_stepping_span_by_span_equals_one_step_bit_for_bit(cls, kwargs, flat, spans):
    whole, parts = _flat_params(), _flat_params()
    schedule = lambda s: kwargs["lr"] * 0.9**s  # noqa: E731
    _train(cls(whole, flat=False, **kwargs), whole, 20, lr_schedule=schedule)
    opt = cls(parts, flat=flat, **kwargs)
    _train(opt, parts, 20, lr_schedule=schedule, spans=spans)
    for i, (a, b) in enumerate(zip(parts, whole)):
        assert torch.equal(a.data, b.data), f"parameter {i}: stepped in spans {spans}, differs from whole steps"
    if cls is Adam:
        assert {entry["step"] for entry in opt.state.values()} == {20}


def test_a_span_counts_only_its_own_parameters():
    params = _flat_params()
    opt = Adam(params, lr=1e-2)
    _train(opt, params, 1)
    before = [p.data.clone() for p in params]
    opt.step(range(1, 3))
    assert [opt.state[i]["step"] for i in range(3)] == [1, 2, 2]
    assert torch.equal(params[0].data, before[0]), "a parameter outside the span moved"
    assert not torch.equal(params[2].data, before[2])


@pytest.mark.parametrize("span", [range(0, 0), range(2, 4), range(0, 3, 2), slice(0, 1), [0]])
def test_a_bad_span_is_refused(span):
    params = _flat_params()
    with pytest.raises(ValueError, match="span must be a non-empty range"):
        Adam(params, lr=1e-2).step(span)
