"""Small batches replayed as CUDA graphs: which batches are captured, when, and what comes back.

CI has no GPU, so `capture` is given a CPU stand-in with a CUDA graph's semantics: the forward pass
is recorded on a static input and every replay overwrites the same static output."""

import contextlib
import logging

import torch
from torch import nn

from echoshot_ai_server.engine.graphs import GraphedForward


class Recorder:
    def __init__(self, fail=False, fail_first=0):
        self.captures, self.replays, self.fail, self.fail_first = [], 0, fail, fail_first

    def __call__(self, forward, static_input, pool):
        if self.fail or self.fail_first:
            self.fail_first = max(0, self.fail_first - 1)
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures.append(tuple(static_input.shape))
        output = forward(static_input)

        def replay():
            self.replays += 1
            output.copy_(forward(static_input))

        return replay, output


class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.calls = nn.Conv2d(3, 3, 3, padding=1), 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


def frames(n, h, w, seed):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_a_shape_runs_as_it_is_once_then_is_captured_and_replayed():
    model, capture = Counted(), Recorder()
    graphed = GraphedForward(model, max_pixels=4 * 8 * 8, capture=capture)
    batches = [frames(4, 8, 8, seed) for seed in range(4)]
    results = [graphed(x) for x in batches]
    # first: the plain forward pass (cuDNN sets the shape up), then captured; every later batch replayed
    assert capture.captures == [(4, 3, 8, 8)] and capture.replays == 3
    assert model.calls == 1 + 1 + 3  # the plain pass, the capture's, one a replay (the stand-in re-runs)
    for x, got in zip(batches, results):  # each result is the model's for its own input
        assert torch.allclose(got, model.conv(x), atol=1e-6)
    # a result handed out earlier is a copy: later replays do not overwrite it
    assert not torch.allclose(results[1], results[2])


@torch.no_grad()
def test_a_shape_is_captured_right_after_its_first_plain_run_never_before_it():
    """cuDNN sets up a shape it has not seen by allocating memory of its own, which invalidates a capture
    ("CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED" on an H200): a stand-in that fails the
    same way shows that no shape is captured before it has run once."""
    ran, capturing = set(), [False]

    class CudnnLike(Counted):
        def forward(self, x):
            if capturing[0] and tuple(x.shape) not in ran:
                raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED")
            if not capturing[0]:
                ran.add(tuple(x.shape))
            return super().forward(x)

    class Capturing(Recorder):
        def __call__(self, forward, static_input, pool):
            capturing[0] = True
            try:
                return super().__call__(forward, static_input, pool)
            finally:
                capturing[0] = False

    model, capture = CudnnLike(), Capturing()
    graphed = GraphedForward(model, max_pixels=10**6, capture=capture)
    for shape in ((2, 8, 8), (1, 6, 10)):
        x = frames(*shape, 0)
        assert torch.allclose(graphed(x), model.conv(x), atol=1e-6)
        assert capture.captures[-1] == (shape[0], 3, *shape[1:])  # captured at its first batch, after it ran
        graphed(x)
    assert capture.replays == 2 and not graphed.broken


@torch.no_grad()
def test_large_batches_are_never_captured_and_the_least_recent_graph_goes():
    model, capture = Counted(), Recorder()
    graphed = GraphedForward(model, max_pixels=2 * 8 * 8, keep=2, capture=capture)
    for _ in range(3):
        graphed(frames(4, 8, 8, 0))  # 256 pixels: above the limit
    assert capture.captures == []
    for h in (4, 5, 6):
        graphed(frames(2, h, 8, 0))
        graphed(frames(2, h, 8, 1))
    assert capture.captures == [(2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 6, 8)]
    assert [key[0] for key in graphed.graphs] == [(2, 3, 5, 8), (2, 3, 6, 8)]
    calls = model.calls
    got = graphed(frames(2, 4, 8, 2))  # evicted, run before: captured again at once, then replayed
    assert capture.captures[-1] == (2, 3, 4, 8) and capture.replays == 4 and model.calls == calls + 2
    assert torch.allclose(got, model.conv(frames(2, 4, 8, 2)), atol=1e-6)


@torch.no_grad()
def test_a_failed_capture_leaves_every_batch_to_the_plain_forward_pass(caplog):
    # a capture that fails leaves PyTorch's allocator recording into the graphs' pool, so that every
    # later capture would fail too ("already recording to mempool_id"): none is tried again
    model, capture = Counted(), Recorder(fail_first=1)
    graphed = GraphedForward(model, max_pixels=10**6, capture=capture)
    x, y = frames(1, 8, 8, 0), frames(2, 6, 6, 0)
    with caplog.at_level(logging.WARNING):
        outputs = [graphed(x) for _ in range(3)] + [graphed(y) for _ in range(2)]
    assert all(torch.allclose(out, model.conv(x), atol=1e-6) for out in outputs[:3])
    assert all(torch.allclose(out, model.conv(y), atol=1e-6) for out in outputs[3:])
    assert graphed.broken and not graphed.graphs and capture.captures == []
    assert sum("capturing a CUDA graph" in r.getMessage() for r in caplog.records) == 1  # tried once only


@torch.no_grad()
def test_while_bypassed_nothing_is_captured():
    # the warm-up's dry pass records kernel launches instead of running them: nothing to capture
    bypassed = [True]
    capture = Recorder()
    graphed = GraphedForward(Counted(), max_pixels=10**6, capture=capture, bypass=lambda: bypassed[0])
    for _ in range(3):
        graphed(frames(1, 8, 8, 0))
    assert capture.captures == [] and not graphed.seen
    bypassed[0] = False
    graphed(frames(1, 8, 8, 0))
    graphed(frames(1, 8, 8, 0))
    assert capture.captures == [(1, 3, 8, 8)] and capture.replays == 1


def test_captures_on_one_device_share_one_side_stream(monkeypatch):
    """PyTorch's allocator gives a block of the graphs' shared pool only to allocations on the stream
    it was allocated on: were each capture on a stream of its own, every graph would grow the pool.
    CUDA's stream, graph and stream switch are stand-ins here (CI has no GPU)."""
    from echoshot_ai_server.engine import graphs

    class Stream:
        def __init__(self, device=None):
            self.device = device

        def wait_stream(self, other):
            pass

    class Graph:
        def capture_begin(self, pool=None, capture_error_mode=None):
            pass

        def capture_end(self):
            pass

        def replay(self):
            pass

    captured_on = []

    @contextlib.contextmanager
    def on(stream):
        captured_on.append(stream)
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: object.__new__(Stream))
    monkeypatch.setattr(graphs, "_capture_streams", {}, raising=False)
    for shape in ((1, 3, 8, 8), (2, 3, 8, 8), (1, 3, 16, 8)):
        replay, output = graphs.capture_cuda_graph(lambda x: x * 2, torch.ones(shape), pool=None)
        assert torch.equal(output, torch.full(shape, 2.0))
    assert len(captured_on) == 3 and all(stream is captured_on[0] for stream in captured_on)
    # another device captures on a stream of its own
    graphs.capture_cuda_graph(lambda x: x * 2, torch.ones((1, 3, 8, 8), device="meta"), pool=None)
    assert captured_on[-1] is not captured_on[0] and captured_on[-1].device == torch.device("meta")
